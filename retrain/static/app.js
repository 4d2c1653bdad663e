// The retrain page: pick, drop, paste or photograph an image; POST it to /v1/classify;
// show the top labels as bars with the time taken. Talks only to this server (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_upload_bytes: 10 * 1024 * 1024, default_top_k: 5 };
let stream = null;
let previewUrl = null;

function setState(s) { document.body.dataset.state = s; }

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function errorMessage(resp) {
  try {
    const j = await resp.json();
    if (j && j.error && j.error.message) return j.error.message;
  } catch (_) { /* not JSON */ }
  return `the server answered ${resp.status} ${resp.statusText}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/model");
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const m = await resp.json();
    limits = m.limits || limits;
    const acc = m.metrics && m.metrics.test && m.metrics.test.accuracy;
    $("model").textContent = `${m.architecture || "model"} · ${m.labels.length} labels` +
      (acc !== undefined && acc !== null ? ` · test accuracy ${(acc * 100).toFixed(1)}%` : "") +
      ` · ${m.model_id}`;
    $("model").title = m.labels.join(", ");
    setState("ready");
  } catch (e) {
    $("model").textContent = "";
    showError(`Cannot reach the model: ${e.message}`);
    setState("error");
  }
}

// A picture over the server's size limit is shrunk (longest side 1600 px, JPEG) before upload:
// the model looks at a small centre crop, so this loses nothing it uses.
async function shrinkIfNeeded(blob) {
  if (blob.size <= limits.max_upload_bytes) return blob;
  try {
    const bmp = await createImageBitmap(blob);
    const scale = Math.min(1, 1600 / Math.max(bmp.width, bmp.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bmp.width * scale);
    canvas.height = Math.round(bmp.height * scale);
    canvas.getContext("2d").drawImage(bmp, 0, 0, canvas.width, canvas.height);
    return await new Promise((ok) => canvas.toBlob(ok, "image/jpeg", 0.92));
  } catch (_) {
    return blob; // the browser cannot decode it either: let the server say what is wrong
  }
}

function render(result, elapsedMs) {
  $("label").textContent = result.label;
  const bars = $("bars");
  bars.replaceChildren();
  for (const p of result.predictions) {
    const li = document.createElement("li");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(100, p.score * 100)).toFixed(1)}%`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = p.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)}%`;
    li.append(fill, name, score);
    li.dataset.label = p.label;
    li.dataset.score = p.score;
    bars.append(li);
  }
  const server = result.time_ms && result.time_ms.total;
  $("time").textContent = `${Math.round(elapsedMs)} ms` +
    (server !== undefined ? ` (server ${server.toFixed(0)} ms)` : "");
}

async function classify(blob) {
  if (!blob) return;
  showError("");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(blob);
  $("preview").src = previewUrl;
  $("output").hidden = false;
  $("label").textContent = "…";
  $("bars").replaceChildren();
  $("time").textContent = "";
  setState("working");
  const t0 = performance.now();
  try {
    const body = await shrinkIfNeeded(blob);
    const k = Math.max(5, limits.default_top_k || 5);
    const resp = await fetch(`/v1/classify?top_k=${k}`, {
      method: "POST",
      headers: { "Content-Type": body.type && body.type.startsWith("image/") ? body.type : "application/octet-stream" },
      body,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const result = await resp.json();
    render(result, performance.now() - t0);
    setState("done");
  } catch (e) {
    $("label").textContent = "";
    showError(e.message);
    setState("error");
  }
}

// --- camera (where the browser allows it: https or localhost) ---
async function startCamera() {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    $("video").srcObject = stream;
    $("video").hidden = false;
    await $("video").play();
    $("camera-start").hidden = true;
    $("camera-shoot").hidden = false;
    $("camera-stop").hidden = false;
  } catch (e) {
    showError(`Cannot open the camera: ${e.message}`);
  }
}

function stopCamera() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("video").hidden = true;
  $("camera-start").hidden = false;
  $("camera-shoot").hidden = true;
  $("camera-stop").hidden = true;
}

function shoot() {
  const v = $("video");
  if (!v.videoWidth) return;
  const canvas = document.createElement("canvas");
  canvas.width = v.videoWidth;
  canvas.height = v.videoHeight;
  canvas.getContext("2d").drawImage(v, 0, 0);
  canvas.toBlob((b) => classify(b), "image/jpeg", 0.92);
}

function init() {
  $("file").addEventListener("change", (e) => {
    classify(e.target.files[0]);
    e.target.value = ""; // choosing the same file again still triggers
  });
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) classify(f);
  });
  // Dropping a file anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) classify(item.getAsFile());
  });
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.isSecureContext) {
    $("camera-start").hidden = false;
    $("camera-start").addEventListener("click", startCamera);
    $("camera-stop").addEventListener("click", stopCamera);
    $("camera-shoot").addEventListener("click", shoot);
  }
  loadModel();
}

init();
