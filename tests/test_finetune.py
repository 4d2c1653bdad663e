"""`retrain fit --fine-tune` on tiny generated images: one short epoch, export, interruption, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_dataset, run_cli

pytest.importorskip("torch")


def test_lr_schedule_warms_up_then_decays():
    from retrain.finetune import lr_at

    lrs = [lr_at(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


def test_tail_reproduces_the_frozen_backbone():
    """prefix(x) -> tail == the backbone's own features, before any training."""
    import torch

    from retrain.architectures import get_backbone
    from retrain.features import build_torch, feature_module
    from retrain.backbone_split import make_prefix, make_tail

    bb = get_backbone("efficientnet_lite0")
    m = build_torch(bb)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = feature_module(m)(x)
        got = make_tail(m, 14).eval()(make_prefix(m, 14)(x))
    assert torch.allclose(ref, got, atol=1e-4)


def test_tail_with_folded_norms_trains_like_the_library_blocks():
    """The tail runs its batch norms folded into the convolutions (for speed); in a training
    step (stochastic depth on, norms frozen) it gives the library blocks' loss and gradients,
    for every parameter, including those of the norms."""
    import torch

    from retrain.architectures import get_backbone
    from retrain.backbone_split import make_tail
    from retrain.features import build_torch

    m = build_torch(get_backbone("efficientnet_lite0"))
    tail = make_tail(m, 8).train()  # the default --unfreeze 8: blocks 8-15 and the head conv
    library = make_tail(m, 8, fold_norms=False).train()  # the same modules, the library's forward
    x = torch.randn(4, 80, 14, 14, generator=torch.Generator().manual_seed(0))

    def step(forward):
        tail.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same stochastic-depth draws
        loss = forward(x).square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in tail.named_parameters()}

    (l_ref, g_ref), (l_got, g_got) = step(library), step(tail)
    assert abs(l_ref - l_got) <= 1e-5 * abs(l_ref)
    assert g_ref.keys() == g_got.keys() and any("bn" in n for n in g_ref)
    for n in g_ref:
        scale = g_ref[n].abs().max().item() + 1e-12
        assert (g_ref[n] - g_got[n]).abs().max().item() <= 1e-3 * scale, n

@pytest.mark.slow
def test_fine_tune_one_epoch_exports_a_self_contained_model(tmp_path):
    from retrain.classifier import Classifier

    data = make_dataset(tmp_path / "images", per_class=8)
    out = tmp_path / "run"
    p = run_cli("fit", data, "-o", out, "--fine-tune", "--epochs", "1", "--unfreeze", "1", "--tta")
    assert "Fine-tuning: blocks 15-15" in p.stderr and "epoch 1:" in p.stderr
    assert ("Fine-tuning trains efficientnet_lite0, the first network of efficientnet_lite0+efficientnet_lite1; "
            "efficientnet_lite1 stays frozen beside it") in p.stderr  # the default joins two networks
    rep = json.loads((out / "report.json").read_text())
    assert rep["architecture"] == "efficientnet_lite0+efficientnet_lite1" and rep["backbone"]["feature_dim"] == 2560
    ft = rep["train"]["fine_tune"]
    assert ft["network"] == "efficientnet_lite0" and ft["frozen_beside"] == ["efficientnet_lite1"]
    assert ft["start_head"]["features"] == 1280  # it started from a head on lite0's features alone
    assert ft["epochs_run"] == 1 and ft["first_unfrozen_block"] == 15
    assert ft["views_per_image"] == 6  # cached distorted views even without distortion flags
    # One epoch is one of the last FULL_SIDE_EPOCHS: at the scoring side, no 160 px views computed.
    assert ft["training_side"] == 224 == ft["side"] and "trained on views at" not in p.stderr
    assert ft["mixup_alpha"] > 0 and ft["dropout"] > 0  # the report records the recipe that made the model
    fl = ft["final_layer"]  # the fine-tuned head, or an L-BFGS one on the fine-tuned features if better
    assert fl["chosen"] in ("lbfgs", "fine-tuned") and fl["lbfgs"]["l2"] > 0
    refit = rep["train"].get("refit")
    assert (fl["chosen"] == "lbfgs") == (refit is not None and refit["features"] == "fine-tuned")
    # The model computes what the final layer saw: the fine-tuned lite0's features beside lite1's.
    assert rep["export_parity_max_abs_diff"] < 2e-3
    assert not (tmp_path / ".run.fine-tune-checkpoint.pt").exists()  # finished: removed
    clf = Classifier(out, provider="cpu")
    assert clf.meta["fine_tuned"] is True and clf.tta_default is True
    assert clf.input_name == "input" and clf.output_name == "final_result"
    assert (clf.height, clf.width) == (224, 224)  # fine-tuning trains at the side lite0 was trained at, not 288
    # The exported ONNX (fine-tuned backbone + head) labels the pictures of a class as that class.
    res = json.loads(run_cli("label", out, data / "circle", "--json").stdout)
    assert all(r["predictions"][0]["label"] == "circle" for r in res)


@pytest.mark.slow
def test_the_same_fine_tune_whatever_the_cache_held(tmp_path):
    """A fit that exports the frozen part's graph (the first fine-tune at that split) and one that
    finds it exported train alike: building a network draws from torch's generator, and the
    masks of dropout and stochastic depth must not depend on it."""
    from retrain.files import cache_root

    data = make_dataset(tmp_path / "images", per_class=8)
    losses = []
    for run in ("exports", "finds"):
        if run == "exports":
            for graph in (cache_root() / "backbones").glob("*-prefix15.onnx"):
                graph.unlink()
        out = tmp_path / run
        p = run_cli("fit", data, "-o", out, "--fine-tune", "--epochs", "1", "--unfreeze", "1",
                    "--cache-dir", tmp_path / f"cache-{run}")
        assert ("Exporting the frozen part" in p.stderr) == (run == "exports")
        losses.append(json.loads((out / "report.json").read_text())["train"]["fine_tune"]["history"][0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


@pytest.mark.slow
def test_interrupted_fine_tune_resumes(tmp_path):
    """kill -9 after the first epoch's checkpoint; --resume carries on from it."""
    data = make_dataset(tmp_path / "images", per_class=8)
    out = tmp_path / "run"
    ckpt = tmp_path / ".run.fine-tune-checkpoint.pt"
    args = [sys.executable, "-m", "retrain", "fit", str(data), "-o", str(out), "--fine-tune",
            "--epochs", "30", "--unfreeze", "2", "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written after an epoch"
    assert not (out / "model.onnx").exists()
    p = run_cli("fit", data, "-o", out, "--fine-tune", "--epochs", "30", "--unfreeze", "2", "--resume")
    assert "resumed after epoch" in p.stderr
    assert "trained on views at 160 px (scored at 224 px)" in p.stderr  # the first 26 epochs
    rep = json.loads((out / "report.json").read_text())
    assert rep["train"]["fine_tune"]["training_side"] == 160
    assert rep["train"]["fine_tune"]["epochs_run"] >= 2
    assert not ckpt.exists()
    # A checkpoint made with other settings is refused in one line.
    q = run_cli("fit", data, "-o", out, "--fine-tune", "--resume", check=False)
    assert q.returncode == 2 and "Traceback" not in q.stderr and "--resume" in q.stderr


def test_fine_tuning_the_default_trains_its_first_network_on_the_head_only_bottlenecks(tmp_path):
    """--fine-tune of the default (Lite0 + Lite1) keeps both networks, trains Lite0 (scored at the
    side it was trained at), and reads the same bottleneck cache as the head-only fit."""
    from retrain.config import FitConfig
    from retrain.fit_data import plan_fit

    (tmp_path / "photos").mkdir()
    tuned, head_only = (plan_fit(FitConfig(image_dir=str(tmp_path / "photos"), output=str(tmp_path / f"r{i}"),
                                           fine_tune=f))
                        for i, f in enumerate((True, False)))
    assert tuned.backbone == head_only.backbone and tuned.precision == head_only.precision
    assert tuned.backbone.tuned_network.name == "efficientnet_lite0"
    assert tuned.backbone.tuned_network.image_size == 224 == tuned.backbone.image_size
    # Its training views are smaller (160 px), its centre views (validation, features, the
    # model) stay at 224 px; other networks' sides scale alike, to a multiple of 16.
    from retrain.architectures import get_backbone
    from retrain.finetune import train_side

    assert train_side(tuned.backbone.tuned_network) == 160
    assert [train_side(get_backbone(n).at_size(s)) for n, s in (("efficientnet_lite1", 240),
                                                                ("efficientnet_lite2", 260))] == [176, 192]


def test_fine_tune_flag_errors_are_one_line(tiny_dataset, tmp_path):
    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "r", "--resume", check=False)
    assert p.returncode == 2 and "--fine-tune" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "r", "--fine-tune", "--unfreeze", "40", check=False)
    assert p.returncode == 2 and "--unfreeze" in p.stderr and "Traceback" not in p.stderr


def _fine_tuned_data(seed=0):
    """A Plan and Data as fit makes them after fine-tuning: 5 classes of 1280-d features that
    overlap (so that a head's calibration differs from another's), a fixed split."""
    import numpy as np

    from retrain.config import FitConfig
    from retrain.fit_data import Data, Plan

    rng = np.random.default_rng(seed)
    k, n = 5, 600
    y = np.arange(n) % k
    X = (rng.normal(size=(k, 1280))[y] * 0.08 + rng.normal(size=(n, 1280))).astype(np.float32)
    order = rng.permutation(n)
    parts = {"train": np.sort(order[:420]), "validation": np.sort(order[420:510]), "test": np.sort(order[510:])}
    plan = Plan(FitConfig(image_dir="unused", fine_tune=True), None, None, "fp32", "lbfgs", None, 0)
    return plan, Data(None, None, [], X, y, [f"c{i}" for i in range(k)], parts, [], [], {})


def test_after_fine_tuning_the_final_layer_is_the_better_one_on_validation_and_learns_from_validation():
    """fit --fine-tune ends with the head that fine-tuning trained, or an L-BFGS head on the
    fine-tuned features, whichever has the lower calibrated validation cross entropy; the
    L-BFGS one is then refitted on train + validation and scores the test split."""
    import numpy as np

    from retrain.final_layer import final_layer_on_fine_tuned
    from retrain.head import Head, train_lbfgs
    from retrain.progress import Log

    plan, data = _fine_tuned_data()
    tr, va, te = data.split
    C = data.X.shape[1]

    # A head fine-tuning left wrong (each class with the next one's weights): L-BFGS's wins, alone.
    good = train_lbfgs(data.X[tr], data.y[tr], data.X[va], data.y[va], 5)[0]
    weak = Head(*good.folded(), np.zeros(C), np.ones(C))
    weak.W = np.roll(weak.W, 1, axis=1)
    info = {"fine_tune": {}}
    final, selection = final_layer_on_fine_tuned(plan, data, weak, info, Log.silent())
    fl = info["fine_tune"]["final_layer"]
    assert fl["chosen"] == "lbfgs"
    assert fl["lbfgs"]["validation_calibrated_cross_entropy"] < fl["fine-tuned"]["validation_calibrated_cross_entropy"]
    assert info["refit"]["on"] == "train + validation" and info["refit"]["n"] == len(tr) + len(va)
    assert selection is not final and selection is not weak
    # The refitted head has learnt the validation photos; the selection head has not.
    fit_va = lambda h: (h.logits(data.X[va]).argmax(1) == data.y[va]).mean()  # noqa: E731
    assert fit_va(final) > fit_va(selection)

    # A fine-tuned head better on validation than any head trained without those photos is kept.
    seen = np.concatenate([tr, va])
    strong = train_lbfgs(data.X[seen], data.y[seen], data.X[:0], data.y[:0], 5, l2=1e-3)[0]
    info = {"fine_tune": {}}
    final, selection = final_layer_on_fine_tuned(plan, data, strong, info, Log.silent())
    assert info["fine_tune"]["final_layer"]["chosen"] == "fine-tuned" and "refit" not in info
    assert final is selection is strong


def test_after_fine_tuning_a_weighted_sum_of_the_two_heads_is_kept_where_validation_prefers_it():
    """A fine-tuned head weaker alone than L-BFGS's but knowing something it does not (here: a few
    features, trained on photos L-BFGS's head never saw): the sum of their calibrated logits
    scores validation better than either, is kept, and learns from validation like L-BFGS's."""
    import numpy as np

    from retrain.calibrate import fit_temperature, nll
    from retrain.final_layer import BLEND_WEIGHTS, final_layer_on_fine_tuned
    from retrain.head import Head, train_lbfgs
    from retrain.progress import Log

    plan, data = _fine_tuned_data()
    tr, va, te = data.split
    C, few = data.X.shape[1], 48
    seen = np.concatenate([tr, va])
    h = train_lbfgs(data.X[seen][:, :few], data.y[seen], data.X[:0, :few], data.y[:0], 5, l2=1e-1)[0]
    W, b = h.folded()
    tuned = Head(np.pad(W, ((0, C - few), (0, 0))), b.astype(np.float64), np.zeros(C), np.ones(C))
    info = {"fine_tune": {}}
    final, selection = final_layer_on_fine_tuned(plan, data, tuned, info, Log.silent())
    fl = info["fine_tune"]["final_layer"]
    ce = {name: s["validation_calibrated_cross_entropy"] for name, s in fl.items() if name != "chosen"}
    assert fl["chosen"].startswith("blend") and fl[fl["chosen"]]["fine_tuned_weight"] in BLEND_WEIGHTS
    assert ce[fl["chosen"]] == min(ce.values()) < min(ce["fine-tuned"], ce["lbfgs"]) - 0.02
    # The selection head is that sum, as recorded; the final one sums the refitted L-BFGS head instead.
    zva, yva = selection.logits(data.X[va]), data.y[va]
    assert nll(zva, yva, fit_temperature(zva, yva)) == pytest.approx(ce[fl["chosen"]], rel=1e-6)
    assert info["refit"]["n"] == len(seen)
    fit_va = lambda h: (h.logits(data.X[va]).argmax(1) == data.y[va]).mean()  # noqa: E731
    assert fit_va(final) > fit_va(selection)


def test_prefix_activations_pool_holds_each_training_photos_centre_and_its_own_views(tmp_path):
    """The training pool (photo, view) is filled in place from the cache: row j is view_items[j]'s
    centre view, then its distorted views, each the frozen prefix of that very view; a second
    call reads the same numbers back from the cache."""
    import numpy as np

    from retrain import augment, images
    from retrain.architectures import get_backbone
    from retrain.backbone_split import prefix_activations, prefix_onnx
    from retrain.runtime import OnnxEngine, make_session
    from retrain.scan import scan

    bb = get_backbone("efficientnet_lite0")
    items = scan(make_dataset(tmp_path / "images", per_class=3), quiet=True).items
    d = augment.Distortions(flip_left_right=True, random_crop=20.0, random_scale=30.0, random_brightness=15.0)
    train = np.array([7, 2, 5])  # not in order, and not every photo
    kw = dict(views=2, distortions=d, view_items=train, provider="cpu", quiet=True)
    acts = prefix_activations(items, bb, 14, tmp_path / "cache", **kw)
    centre, pool, shape, t = acts.centre, acts.pool, acts.shape, acts.timing
    assert t["computed"] == len(items) + 2 * len(train) and pool.shape == (3 * 3, int(np.prod(shape)))
    np.testing.assert_array_equal(acts.rows, np.arange(9).reshape(3, 3))  # photo by photo, centre first
    assert centre.shape == (len(items), pool.shape[1]) and np.isfinite(centre).all()
    assert acts.pool_shape == shape

    engine = OnnxEngine(make_session(prefix_onnx(bb, 14), provider="cpu"))
    size, crop = bb.image_size, bb.crop_fraction

    def prefix(img):
        return engine(images.normalize(img[None], bb.mean, bb.std))[0].reshape(-1)

    at = acts.rows
    for j, i in enumerate(train):
        np.testing.assert_array_equal(pool[at[j, 0]], centre[i])
        np.testing.assert_allclose(pool[at[j, 0]], prefix(images.load(items[i].path, size, crop)), atol=2e-2, rtol=1e-2)
        for v in range(2):
            view = augment.load_view(items[i].path, items[i].digest, v, d, size, crop)
            np.testing.assert_allclose(pool[at[j, 1 + v]], prefix(view), atol=2e-2, rtol=1e-2)
    assert not np.array_equal(pool[at[0, 1]], pool[at[0, 2]])  # two different views
    other = next(i for i in range(len(items)) if i not in train)
    np.testing.assert_allclose(centre[other], prefix(images.load(items[other].path, size, crop)), atol=2e-2, rtol=1e-2)

    again = prefix_activations(items, bb, 14, tmp_path / "cache", **kw)
    assert again.timing["computed"] == 0
    np.testing.assert_array_equal(again.pool, pool)
    np.testing.assert_array_equal(again.centre, centre)

    # Training views at a smaller side: the pool is those views through a prefix exported at that
    # side (its own cache), the centre views stay at the backbone's side (the same numbers).
    small = prefix_activations(items, bb, 14, tmp_path / "cache", train_side=160, **kw)
    assert small.shape == shape and small.pool_shape == (shape[0], 5, 5)  # 288 px -> 9x9, 160 px -> 5x5
    assert small.pool.shape == (3 * 3, int(np.prod(small.pool_shape)))
    assert small.timing["computed"] == 3 * len(train) and small.timing["training_side"] == 160
    np.testing.assert_array_equal(small.centre, centre)
    bb160 = dataclasses.replace(bb, image_size=160, crop=crop)  # the same field of view
    engine160 = OnnxEngine(make_session(prefix_onnx(bb160, 14), provider="cpu"))
    j, i = 1, train[1]
    view = augment.load_view(items[i].path, items[i].digest, 1, d, 160, crop)
    def prefix160(img):
        return engine160(images.normalize(img[None], bb.mean, bb.std))[0].reshape(-1)

    np.testing.assert_allclose(small.pool[small.rows[j, 2]], prefix160(view), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(small.pool[small.rows[j, 0]], prefix160(images.load(items[i].path, 160, crop)),
                               atol=2e-2, rtol=1e-2)

    # Only the views asked for (those the epochs draw): the others are neither computed nor cached.
    slots = np.array([[True, False, True], [False, False, False], [True, True, False]])
    some = prefix_activations(items, bb, 14, tmp_path / "fresh", slots=slots, **kw)
    assert some.timing["computed"] == len(items) + 2  # every centre view, and 2 distorted ones
    np.testing.assert_array_equal(some.rows, [[0, -1, 1], [2, -1, -1], [3, 4, -1]])
    np.testing.assert_array_equal(some.pool[some.rows[0, 2]], pool[at[0, 2]])
    np.testing.assert_array_equal(some.pool[some.rows[2, 1]], pool[at[2, 1]])
    np.testing.assert_array_equal(some.centre, centre)
    assert prefix_activations(items, bb, 14, tmp_path / "fresh", **kw).timing["computed"] == 4  # the 4 others


def test_recent_decodes_opens_each_photo_once_for_all_its_views(tmp_path):
    """prefix_activations' loader threads ask for a photo once per view (7 times by default):
    it is decoded once, the other threads wait for that decode; a photo that cannot be read
    gives every view the same one-line reason."""
    import threading

    from retrain import images
    from retrain.backbone_split import RecentDecodes
    from retrain.errors import ImageError

    photos = make_dataset(tmp_path / "images", classes=("a",), per_class=3)
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))
    (photos / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    calls, lock = [], threading.Lock()

    def decode(path):
        with lock:
            calls.append(path)
        return images.open_image(path, draft_size=256)

    recent = RecentDecodes(keep=2)
    got = {}

    def view(path, v):
        got[(path, v)] = recent.get(path, lambda: decode(path))

    threads = [threading.Thread(target=view, args=(paths[0], v)) for v in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [paths[0]] and len({id(im) for im in got.values()}) == 1
    assert got[(paths[0], 0)].size == images.open_image(paths[0]).size

    for p in paths[1:]:  # two more photos: the first one is no longer kept
        recent.get(p, lambda p=p: decode(p))
    recent.get(paths[0], lambda: decode(paths[0]))
    assert calls == [paths[0], paths[1], paths[2], paths[0]]

    broken = str(photos / "a" / "broken.jpg")
    reasons = set()
    for _ in range(3):
        with pytest.raises(ImageError) as e:
            recent.get(broken, lambda: decode(broken))
        reasons.add(str(e.value))
    assert len(reasons) == 1 and calls.count(broken) == 1


def test_the_last_epochs_train_at_the_side_the_model_is_scored_at(tmp_path):
    """Training views at a smaller side than the centre views: the epochs read the pool's small
    maps, the last FULL_SIDE_EPOCHS the training photos' centre views at the scoring side, and
    validation always scores at that side."""
    import numpy as np
    import torch

    from retrain import finetune
    from retrain.config import FitConfig
    from retrain.finetune import ActivationData, Trainable, make_loop, train_epochs
    from retrain.progress import Log

    torch.manual_seed(0)
    tail = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    seen = []  # (training?, side) of every batch the tail ran on
    tail.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    net = Trainable(tail, torch.nn.Identity(), torch.nn.Linear(8, 3), "cpu")
    rng = np.random.default_rng(0)
    n, small, full = 70, (4, 2, 2), (4, 3, 3)
    data = ActivationData(rng.normal(size=(3 * n, 16)).astype(np.float16), np.arange(3 * n).reshape(n, 3),
                          finetune.view_draws(0, n, 2, 4), torch.from_numpy(rng.integers(0, 3, n)),
                          torch.from_numpy(rng.normal(size=(5, *full)).astype(np.float32)),
                          torch.from_numpy(rng.integers(0, 3, 5)), full, small,
                          rng.normal(size=(n, 36)).astype(np.float16))
    n_full = finetune.FULL_SIDE_EPOCHS  # not `full`, the shape above
    cfg = FitConfig(image_dir=str(tmp_path), epochs=n_full + 2, quiet=True)
    train_epochs(make_loop(cfg, net, data, "test", tmp_path / "checkpoint.pt", "cpu", Log.silent()))

    steps = -(-n // finetune.BATCH)
    training = [side for is_training, side in seen if is_training]
    assert n_full >= 1 and training == [2] * (2 * steps) + [3] * (n_full * steps)
    assert {side for is_training, side in seen if not is_training} == {3}


def test_each_epoch_trains_on_the_views_drawn_up_front(tmp_path, monkeypatch):
    """The views are drawn from the seed before any is computed (view_draws): only those are asked
    for (drawn_slots: about 3.8 of 7 a photo over 4 epochs), and each epoch trains every photo on
    its drawn view, or on its centre view where the drawn one could not be read."""
    import numpy as np
    import torch

    from retrain import finetune
    from retrain.config import FitConfig
    from retrain.finetune import ActivationData, Trainable, drawn_slots, make_loop, train_epochs, view_draws
    from retrain.progress import Log

    draws = view_draws(3, 2000, 6, 8)
    np.testing.assert_array_equal(draws, view_draws(3, 2000, 6, 8))  # the seed alone decides
    assert not np.array_equal(draws, view_draws(4, 2000, 6, 8))
    assert draws.min() == 0 and draws.max() == 6
    slots = drawn_slots(draws, 4, 6)  # the 4 epochs at 160 px of the default recipe
    assert slots[:, 0].all() and slots[np.arange(2000), draws[3]].all()
    assert not slots[np.arange(2000), draws[7]].all()  # the last 4 epochs draw nothing from the pool
    assert 3.6 < slots.sum(1).mean() < 3.95  # 1 + 6 (1 - (6/7)^4) = 3.76: nearly half the views never computed

    monkeypatch.setattr(finetune, "MIXUP_ALPHA", 0.0)  # the rows reach the tail as they are
    torch.manual_seed(0)
    tail = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8))
    read = []  # the pool rows of every training batch: each row holds its own index
    tail.register_forward_pre_hook(lambda m, args: read.append(args[0][:, 0, 0, 0].round().long().tolist())
                                   if m.training else None)
    net = Trainable(tail, torch.nn.Identity(), torch.nn.Linear(8, 3), "cpu")
    n, views, epochs = 70, 2, 3
    rows = np.arange(n * 3).reshape(n, 3).astype(np.int32)
    rows[4, 1:] = -1  # a photo whose distorted views could not be read
    pool = np.repeat(np.arange(n * 3, dtype=np.float16)[:, None], 4, axis=1)
    rng = np.random.default_rng(0)
    draws = view_draws(0, n, views, epochs)
    data = ActivationData(pool, rows, draws, torch.from_numpy(rng.integers(0, 3, n)),
                          torch.zeros(5, 4, 1, 1), torch.from_numpy(rng.integers(0, 3, 5)), (4, 1, 1))
    train_epochs(make_loop(FitConfig(image_dir=str(tmp_path), epochs=epochs, quiet=True), net, data, "test",
                           tmp_path / "checkpoint.pt", "cpu", Log.silent()))
    steps = -(-n // finetune.BATCH)
    for e in range(epochs):
        got = sorted(r for batch in read[e * steps:(e + 1) * steps] for r in batch)
        want = [rows[i, draws[e, i]] if rows[i, draws[e, i]] >= 0 else rows[i, 0] for i in range(n)]
        assert got == sorted(want)
    assert any(draws[e, 4] > 0 for e in range(epochs))  # photo 4 drew an unreadable view at least once
