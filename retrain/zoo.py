"""Named ImageNet backbones that are downloaded once, verified, and kept in the user cache.

The table (ZOO) lists ONNX image classifiers published in the ONNX Model Zoo
(github.com/onnx/models, the `Computer_Vision/*_Opset17_timm` exports of timm models). Each
entry pins the file's SHA-256 and size as the zoo's own Git LFS pointer file states them (at the
commit named in the entry; the download URL names the same commit, so it can never change
under us), the input size (the zoo's turnkey_stats.yaml), and the preprocessing of the weights
(timm's default configuration for that model: mean/std, crop fraction, resize).

`fetch(entry)` finds or downloads the file:
1. the user cache (`<cache>/weights/<file>`), when its size and SHA-256 match;
2. RETRAIN_WEIGHTS_MIRROR (an http(s):// or file:// base URL, or a folder) + /<file>;
3. the entry's URL.
A download goes to `<file>.part` beside the destination, resumes an interrupted one (HTTP Range)
or starts it afresh, shows a progress bar, and is renamed into place only after its size and
SHA-256 are right; a wrong file is deleted and refused. Offline (or with RETRAIN_OFFLINE=1) a
missing file is one MissingDependency line: what is missing, the URL, where to put it.

The codelab's names (`mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>`, `inception_v3`) map to
the nearest entry here (`codelab_alias`), with a one-line note where the exact model (MobileNet
v1) is not published as ONNX.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency
from retrain.files import cache_root, sha256_file

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # timm/torchvision IMAGENET_DEFAULT_MEAN x 255
IMAGENET_STD = (58.395, 57.12, 57.375)  # IMAGENET_DEFAULT_STD x 255
INCEPTION_MEAN = (127.5, 127.5, 127.5)  # IMAGENET_INCEPTION_MEAN (0.5) x 255
INCEPTION_STD = (127.5, 127.5, 127.5)
ZOO_MEDIA = "https://media.githubusercontent.com/media/onnx/models"
ZOO_REPO = "https://github.com/onnx/models/blob"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    path: str  # the file's path in its repository
    commit: str  # the commit whose LFS pointer gave sha256 and size
    sha256: str
    size: int  # bytes
    input_size: int  # square side, pixels
    params: int  # parameters of the whole classifier (turnkey_stats.yaml)
    mean: tuple = IMAGENET_MEAN  # 0..255 units, R, G, B
    std: tuple = IMAGENET_STD
    crop_fraction: float = 0.875
    resize: str = "bicubic"
    weights: str = ""  # which published weights (timm's tag)
    top1: float | None = None  # ImageNet top-1 (%), only where the source states one
    url_base: str = ZOO_MEDIA
    aliases: tuple = field(default_factory=tuple)

    @property
    def filename(self) -> str:
        return Path(self.path).name

    @property
    def url(self) -> str:
        return f"{self.url_base}/{self.commit}/{self.path}"

    @property
    def source(self) -> str:
        """Where the pinned hash comes from (a page a person can open)."""
        return f"{ZOO_REPO}/{self.commit}/{self.path}"

    def preprocessing(self) -> dict:
        return {"size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "crop_fraction": self.crop_fraction, "resize": self.resize}


def _timm(name, description, folder, commit, sha256, size, input_size, params, weights, **kw) -> ZooEntry:
    return ZooEntry(name, description, f"Computer_Vision/{folder}/{folder.rsplit('_timm', 1)[0]}.onnx",
                    commit, sha256, size, input_size, params, weights=weights, **kw)


# sha256 and size: the Git LFS pointer file at `commit` (read, not downloaded); input size and
# parameters: the folder's turnkey_stats.yaml; preprocessing: timm's default_cfg of the weights.
ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    _timm("mobilenetv2_100", "MobileNetV2 1.0 (timm), 3.5M parameters: the codelab's mobilenet_1.0/0.75",
          "mobilenetv2_100_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "fbfdd0ff7c3404264a44644a8d134e5a488e97a926beffb64c774cc534f90681", 13_989_578, 224, 3_504_872,
          "mobilenetv2_100.ra_in1k"),
    _timm("mobilenetv2_050", "MobileNetV2 0.5 (timm), 2.0M parameters: the codelab's mobilenet_0.50",
          "mobilenetv2_050_Opset17_timm", "69d69010b7ed6ba9438c392943d2715026792d40",
          "192f09d45d96c3a4ca8ea271613e2b48c37ac15a93396fde3a4d7b2ea0aad36b", 7_875_877, 224, 1_968_680,
          "mobilenetv2_050.lamb_in1k"),
    _timm("mobilenetv3_large_100", "MobileNetV3-Large 1.0 (timm), 5.5M parameters",
          "mobilenetv3_large_100_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "b0b785f44a068dee4ff35bd88b114d4fd17a8bd635816f8f0ee46fa8b196c29f", 21_919_274, 224, 5_483_032,
          "mobilenetv3_large_100.ra_in1k"),
    _timm("mobilenetv3_small_075", "MobileNetV3-Small 0.75 (timm), 2.0M parameters: the codelab's mobilenet_0.25",
          "mobilenetv3_small_075_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "ef7b5191b3e2586c409ddcfbfef42a6434a9ac885608b8d16e9c767c518f1c31", 8_179_614, 224, 2_041_872,
          "mobilenetv3_small_075.lamb_in1k"),
    _timm("mobilenetv3_small_050", "MobileNetV3-Small 0.5 (timm), 1.6M parameters: the smallest here",
          "mobilenetv3_small_050_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "ce71d83541479fb12b543415aa620d24c518c8ee0cad60990140f05c6ea4e462", 6_391_515, 224, 1_593_224,
          "mobilenetv3_small_050.lamb_in1k"),
    _timm("inception_v3", "Inception v3 (timm, the torchvision weights) at 299 px, 23.8M parameters: the "
          "codelab's inception_v3", "inception_v3_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "d714dcf66d2a2819681b7e1900deab67d5a4be0725014390bd044d1fea746b1c", 95_317_116, 299, 23_834_568,
          "inception_v3.tv_in1k", mean=INCEPTION_MEAN, std=INCEPTION_STD),
    _timm("resnet50", "ResNet-50 (timm), 25.6M parameters", "resnet50_Opset17_timm",
          "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "933e6bfd1edab48eec7a6e67319f82f57e0e8720a1afc9824a39cab3002646f9", 102_146_206, 224, 25_557_032,
          "resnet50.a1_in1k", crop_fraction=0.95),
    _timm("convnext_tiny", "ConvNeXt-T (timm), 28.6M parameters",
          "convnext_tiny_Opset17_timm", "d7a7b063b2e99022c43f3c9e550ad49c560d079a",
          "6736e3ec9d37f6fc1e47aca78ac6f67a922909708ffe5a2428574f8d60a4b4bb", 114_434_309, 224, 28_589_128,
          "convnext_tiny (timm default tag)"),
]}

# The codelab's MobileNet v1 names: width -> the nearest model published as ONNX (by compute).
CODELAB_MOBILENET = re.compile(r"^mobilenet_(1\.0|0\.75|0\.50|0\.5|0\.25)_(224|192|160|128)(_quant(?:ized)?)?$")
CODELAB_WIDTH = {"1.0": "mobilenetv2_100", "0.75": "mobilenetv2_100", "0.50": "mobilenetv2_050",
                 "0.5": "mobilenetv2_050", "0.25": "mobilenetv3_small_075"}


def codelab_alias(name: str):
    """(zoo name, input size or None, note or None) for a codelab architecture name, else None."""
    key = str(name).strip().lower()
    if key == "inception_v3":
        return "inception_v3", None, None
    m = CODELAB_MOBILENET.match(key)
    if not m:
        return None
    width, size, quant = m.groups()
    target = CODELAB_WIDTH[width]
    note = (f"{key}: MobileNet v1 is not published as ONNX; using {target}, the nearest available MobileNet, "
            f"at {size} px")
    if quant:
        note += " (for an 8-bit backbone add --bottleneck-precision int8)"
    return target, int(size), note


def weights_dir() -> Path:
    return cache_root() / "weights"


def cached_file(entry: ZooEntry, *, verify: bool = True) -> Path | None:
    """The entry's file in the user cache, if it is there and (verify) its size and SHA-256 match."""
    p = weights_dir() / entry.filename
    try:
        if p.is_file() and p.stat().st_size == entry.size and (not verify or _verified(p, entry.sha256)):
            return p
    except OSError:
        pass
    return None


def _verified(p: Path, sha256: str) -> bool:
    """SHA-256 check, remembered beside the file (by size and mtime) so a 100 MB file is hashed once."""
    st = p.stat()
    stamp = p.with_name(f".{p.name}.sha256")
    mark = f"{sha256} {st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text() == mark:
            return True
    except OSError:
        pass
    if sha256_file(p) != sha256:
        return False
    try:
        stamp.write_text(mark)
    except OSError:
        pass
    return True


def missing_message(what: str, url: str, dest: Path, reason: str = "") -> str:
    why = f" ({reason})" if reason else ""
    return (f"{what} is not on this machine and could not be downloaded{why}: download {url} and put it at "
            f"{dest} (or set RETRAIN_WEIGHTS_MIRROR to a folder or URL holding {dest.name})")


def fetch(entry: ZooEntry, *, log=None, quiet: bool = False, timeout: float = 30.0) -> Path:
    """The verified local file of `entry`: from the cache, the mirror, or downloaded now."""
    hit = cached_file(entry)
    if hit is not None:
        return hit
    dest = weights_dir() / entry.filename
    if dest.exists() and not dest.is_file():
        raise ConfigError(f"{dest} is not a file: remove it so that retrain can put {entry.filename} there")
    if dest.is_file():  # a file of the right name but the wrong content: never used, never overwritten silently
        raise MissingDependency(f"{dest} is not the published {entry.filename} (its size or SHA-256 differs "
                                f"from {entry.sha256[:12]}...): remove it and run again, or put the right file there")
    mirror = os.environ.get("RETRAIN_WEIGHTS_MIRROR")
    sources = ([_join(mirror, entry.filename)] if mirror else []) + [entry.url]
    what = f"the {entry.name} backbone ({entry.filename}, {entry.size / 1e6:.1f} MB)"
    if os.environ.get("RETRAIN_OFFLINE"):
        raise MissingDependency(missing_message(what, entry.url, dest, "RETRAIN_OFFLINE is set"))
    reasons = []
    for url in sources:
        try:
            return download(url, dest, entry.sha256, size=entry.size, log=log, quiet=quiet, timeout=timeout,
                            desc=entry.name)
        except Unreachable as e:
            reasons.append(str(e) if url == entry.url else f"{url}: {e}")
    raise MissingDependency(missing_message(what, entry.url, dest, "; ".join(reasons)))


def _join(base: str, name: str) -> str:
    if "://" not in base:  # a plain folder
        return Path(base).expanduser().resolve().joinpath(name).as_uri()
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


class Unreachable(Exception):
    """The source could not be reached at all (no network, no such file): try the next one."""


def download(url: str, dest: Path, sha256: str | None, *, size: int | None = None, log=None, quiet: bool = False,
             timeout: float = 30.0, desc: str = "Downloading") -> Path:
    """Fetch `url` to `dest`: through `<dest>.part` (resumed with an HTTP Range request where the
    server allows, else restarted), with a progress bar; renamed into place only once its size
    (if given) and SHA-256 (if given) match. A mismatch deletes the part file and raises
    MissingDependency; an interrupted transfer keeps it for the next attempt and raises too.
    Unreachable sources raise Unreachable (the caller tries the next one)."""
    from retrain.progress import bar

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    lock = _lock(dest.with_name(f".{dest.name}.lock"))
    try:
        if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
            return dest  # another process finished it while we waited for the lock
        have = part.stat().st_size if part.is_file() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        req = urllib.request.Request(url, headers={"User-Agent": "retrain"})
        if have and url.startswith(("http://", "https://")):
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the part file is already whole
                resp = None
            else:
                raise Unreachable(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise Unreachable(str(getattr(e, "reason", e))) from None
        if resp is not None:
            with resp:
                status = getattr(resp, "status", None) or resp.getcode()
                resumed = have and status == 206
                if not resumed:
                    have = 0
                length = resp.headers.get("Content-Length")
                total = size or (have + int(length) if length and length.isdigit() else None)
                try:
                    with open(part, "ab" if resumed else "wb") as out, \
                            bar(total=round(total / 1e6, 1) if total else None, desc=desc, unit="MB",
                                quiet=quiet) as pbar:
                        pbar.update(have / 1e6)
                        while True:
                            chunk = resp.read(1 << 20)
                            if not chunk:
                                break
                            out.write(chunk)
                            pbar.update(len(chunk) / 1e6)
                except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                    if isinstance(e, (PermissionError, IsADirectoryError)) or getattr(e, "errno", None) in (28, 30):
                        raise
                    got = part.stat().st_size if part.is_file() else 0
                    raise MissingDependency(f"download of {url} stopped at {got:,} of {total or '?'} bytes "
                                            f"({e}); run the command again to resume it") from None
        got = part.stat().st_size if part.is_file() else 0
        if size is not None and got < size:
            raise MissingDependency(f"download of {url} stopped at {got:,} of {size:,} bytes; run the command "
                                    "again to resume it")
        if size is not None and got != size:
            part.unlink(missing_ok=True)
            raise MissingDependency(f"download of {url} is {got:,} bytes, expected {size:,}: refusing it")
        digest = sha256_file(part)
        if sha256 is not None and digest != sha256:
            part.unlink(missing_ok=True)
            raise MissingDependency(f"download of {url} has SHA-256 {digest[:12]}..., expected {sha256[:12]}...: "
                                    "refusing it (nothing was kept)")
        os.replace(part, dest)
        if log:
            log(f"Downloaded {dest.name} ({got / 1e6:.1f} MB, SHA-256 {digest[:12]}... verified) to {dest.parent}")
        return dest
    finally:
        _unlock(lock)


def _lock(path: Path):
    """An exclusive lock on `path` (one download of a file at a time, across processes)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        return None
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _unlock(f) -> None:
    if f is not None:
        f.close()


def entry_for(name: str) -> ZooEntry | None:
    return ZOO.get(str(name).strip().lower())
