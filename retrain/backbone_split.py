"""The backbone split in two for `retrain fit --fine-tune` (retrain.finetune): the frozen
prefix (stem + the first blocks), exported to ONNX once and run by ONNX Runtime, whose
activations are cached like bottlenecks, and the tail (the last blocks + the head's conv) that
is trained in PyTorch; and the whole backbone with a fine-tuned tail, exported again.
torch is imported only when one of these runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from retrain.errors import ConfigError, MissingDependency


def load_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependency("--fine-tune needs PyTorch: pip install torch==2.13.0 --index-url "
                                "https://download.pytorch.org/whl/cpu") from None
    return torch


def split_point(model, unfreeze: int) -> int:
    n = len(model._blocks)
    if not 1 <= unfreeze <= n:
        raise ConfigError(f"--unfreeze is a number of backbone blocks from the end, 1 to {n}, got {unfreeze}")
    return n - unfreeze


def make_prefix(model, start: int):
    """(N, 3, H, W) -> activations before block `start` (N, C, h, w): the frozen part."""
    torch = load_torch()

    class Prefix(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.blocks = torch.nn.ModuleList(net._blocks[:start])
            self.rate = net._global_params.drop_connect_rate or 0.0
            self.n = len(net._blocks)

        def forward(self, x):
            x = self.stem(x)
            for i, b in enumerate(self.blocks):
                x = b(x, drop_connect_rate=self.rate * i / self.n)
            return x

    return Prefix(model).eval()


def conv_bn(conv, bn, x):
    """conv then batch norm in eval mode as one convolution: the norm's scale folded into the
    weights and its shift into a bias, computed from the parameters on each call, so that the
    gradients reach the same parameters (conv.weight, bn.weight, bn.bias) as conv -> bn would.
    Symmetric 'same' padding becomes the convolution's own padding instead of a ZeroPad2d.
    Exact up to float rounding; it saves the norm's and the pad's passes over the activations,
    forward and backward (one training step with freed memory kept: 0.82x the library blocks'
    time; BENCHMARKS.md, issue 15, fourth pass)."""
    import torch.nn.functional as F

    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    w = conv.weight * scale.view(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    pad = getattr(conv, "static_padding", None)
    padding = 0
    if pad is not None and hasattr(pad, "padding"):  # a ZeroPad2d: (left, right, top, bottom)
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            padding = (top, left)
        else:
            x = pad(x)
    return F.conv2d(x, w, b, conv.stride, padding, conv.dilation, conv.groups)


def tail_block(blk, x, drop_connect_rate: float):
    """One MBConv block of EfficientNet-Lite with its batch norms folded (conv_bn): the same
    function as blk(x, drop_connect_rate) while the norms are in eval mode. A block with
    squeeze-and-excitation (not in the Lite models) runs the library's own forward."""
    from efficientnet_lite_pytorch.utils import drop_connect

    if blk.has_se:
        return blk(x, drop_connect_rate=drop_connect_rate)
    args, inputs = blk._block_args, x
    if args.expand_ratio != 1:
        x = blk._swish(conv_bn(blk._expand_conv, blk._bn0, x))
    x = blk._swish(conv_bn(blk._depthwise_conv, blk._bn1, x))
    x = conv_bn(blk._project_conv, blk._bn2, x)
    if blk.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=blk.training)
        x = x + inputs
    return x


def make_tail(model, start: int, *, fold_norms: bool = True):
    """Activations before block `start` -> pooled features (N, 1280): the part fine-tuned.
    Its batch norms stay in eval mode, also in training, and run folded into the convolutions
    (tail_block; fold_norms=False runs the library's blocks as they are, for comparison); the
    parameters and their names are the backbone's own."""
    torch = load_torch()

    class Tail(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.blocks = torch.nn.ModuleList(net._blocks[start:])
            self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
            self.rate = net._global_params.drop_connect_rate or 0.0
            self.start, self.n = start, len(net._blocks)

        def forward(self, x):
            for i, b in enumerate(self.blocks):
                rate = self.rate * (self.start + i) / self.n
                x = tail_block(b, x, rate) if fold_norms else b(x, drop_connect_rate=rate)
            x = conv_bn(self.conv_head, self.bn1, x) if fold_norms else self.bn1(self.conv_head(x))
            return self.act(x).mean(dim=(2, 3))

        def train(self, mode: bool = True):
            # Stochastic depth on, batch-norm statistics frozen: batches are small and the
            # ImageNet statistics are good. (Frozen norms are what lets conv_bn fold them.)
            super().train(mode)
            for m in self.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return self

    return Tail(model)


def prefix_onnx(bb, start: int, *, log=None) -> Path:
    """The frozen prefix exported to ONNX once (cached; checked against PyTorch)."""
    from retrain.features import build_torch, export_checked
    from retrain.files import cache_root

    out = cache_root() / "backbones" / f"{bb.name}-{bb.fingerprint()}-prefix{start}.onnx"
    if not out.is_file():
        if log:
            log(f"Exporting the frozen part of {bb.name} (blocks 0-{start - 1}, {bb.image_size} px) "
                "to ONNX once ...")
        export_checked(make_prefix(build_torch(bb), start), out, bb.image_size, output_name="activations")
    return out


def activation_shape(bb, start: int) -> tuple[int, int, int]:
    torch = load_torch()
    from retrain.features import build_torch

    with torch.no_grad():
        a = make_prefix(build_torch(bb), start)(torch.zeros(1, 3, bb.image_size, bb.image_size))
    return tuple(a.shape[1:])


# ------------------------------------------------------------------------ cached prefix activations

class RecentDecodes:
    """The last few photos opened, shared by the loader's threads: the first thread to ask for a
    photo decodes it, the others wait for that one (a decode is about half of a view's cost:
    BENCHMARKS.md, issue 15). A photo that cannot be read raises its ImageError for every view."""

    def __init__(self, keep: int = 16):
        import threading
        from collections import OrderedDict

        self.keep, self.lock, self.recent = keep, threading.Lock(), OrderedDict()

    def get(self, path, decode):
        from concurrent.futures import Future

        with self.lock:
            fut, mine = self.recent.get(path), False
            if fut is None:
                fut, mine = Future(), True
                self.recent[path] = fut
                if len(self.recent) > self.keep:
                    self.recent.popitem(last=False)
        if mine:
            try:
                fut.set_result(decode())
            except BaseException as e:  # noqa: BLE001 - handed to every view of the photo
                fut.set_exception(e)
        return fut.result()


@dataclasses.dataclass
class PrefixActivations:
    """What prefix_activations returns: the activations at the split point, as float16 rows."""

    centre: np.ndarray  # (n, D): every item's centre view at the backbone's side
    pool: np.ndarray  # (m, D'): the computed views of the training items, one row each
    rows: np.ndarray  # (len(view_items), 1 + V) int32: the pool row of (item, slot), slot 0 its centre
    #                   view and 1..V its distorted views; -1 where that view was not asked for
    shape: tuple  # (C, h, w) of a centre row
    pool_shape: tuple  # (C, h', w') of a pool row: smaller than `shape` when trained at a smaller side
    timing: dict


def prefix_activations(items, bb, start: int, cache_dir, *, views: int = 0, distortions=None,
                       view_items=None, slots=None, train_side: int | None = None, provider: str = "auto",
                       batch_size: int = 32, workers=None, quiet=False, log=None) -> PrefixActivations:
    """Prefix activations of each item's centre view and of the views of `view_items`.

    view_items: indices of the items that get distorted views (the training images).
    slots: (len(view_items), 1 + views) bool, the views to compute (slot 0 the centre view, always
    computed, 1..views the distorted ones): those that training will draw (retrain.finetune's
    view_draws); None: all of them.
    train_side: the side of the pool's views (the training ones), when not the backbone's own:
    then the pool is a second pass at that side, through a prefix exported at it, and the
    centre views (validation, features, export) stay at the backbone's side.
    The pool is filled in place from the cache (it is most of the memory: 0.17 GB for the
    flowers at 160 px, 0.26 GB with every view).
    Stored in BottleneckCaches of their own (folders named after the split point and the side).
    """
    view_items = np.arange(len(items)) if view_items is None else np.asarray(view_items, int)
    slots = (np.ones((len(view_items), 1 + views), bool) if slots is None else np.array(slots, bool))
    if slots.shape != (len(view_items), 1 + views):
        raise ValueError(f"slots has shape {slots.shape}, expected {(len(view_items), 1 + views)}")
    slots[:, 0] = True  # the centre view: the fallback of a view that cannot be read
    pairs = np.argwhere(slots)  # row-major: each item's centre view, then its views, item by item
    rows = np.full(slots.shape, -1, np.int32)
    rows[pairs[:, 0], pairs[:, 1]] = np.arange(len(pairs))
    jobs = [(int(view_items[j]), int(s) - 1) for j, s in pairs]
    run = dict(distortions=distortions, provider=provider, batch_size=batch_size, workers=workers,
               quiet=quiet, log=log)
    if not train_side or train_side == bb.image_size:
        others = np.setdiff1d(np.arange(len(items)), view_items)
        # The pool's rows first, then the other items' centre views.
        feats, shape, timing = _prefix_pass(items, bb, start, cache_dir, jobs + [(int(i), -1) for i in others], **run)
        pool = feats[:len(jobs)]
        centre = np.empty((len(items), pool.shape[1]), np.float16)
        centre[view_items] = pool[rows[:, 0]]
        centre[others] = feats[len(jobs):]
        return PrefixActivations(centre, pool, rows, shape, shape, timing)
    # The same field of view at fewer pixels: the centre crop's fraction kept (at_size alone
    # would change it with the side).
    small = dataclasses.replace(bb.at_size(int(train_side)), crop=bb.crop_fraction)
    pool, pool_shape, t_pool = _prefix_pass(items, small, start, cache_dir, jobs,
                                            desc=f"Frozen-part activations at {train_side} px", **run)
    centre, shape, t_centre = _prefix_pass(items, bb, start, cache_dir, [(i, -1) for i in range(len(items))],
                                           desc=f"Frozen-part activations at {bb.image_size} px", **run)
    timing = {k: round(t_pool.get(k, 0) + t_centre.get(k, 0), 3)
              for k in ("computed", "cached", "seconds", "decode_wait_s", "compute_s")}
    return PrefixActivations(centre, pool, rows, shape, pool_shape, {**timing, "training_side": int(train_side)})


def _prefix_pass(items, bb, start, cache_dir, jobs, *, distortions, provider, batch_size, workers, quiet,
                 log, desc="Frozen-part activations"):
    """The prefix activations of `jobs` ((item, view) pairs, view -1 the centre), at bb's side,
    from the cache or computed. Returns ((len(jobs), D) float16, (C, h, w), timing)."""
    from retrain import augment, images
    from retrain.bottlenecks import compute_cached
    from retrain.cache import BottleneckCache, key_of
    from retrain.runtime import OnnxEngine, make_session

    shape = activation_shape(bb, start)
    pseudo = dataclasses.replace(bb, name=f"{bb.name}-prefix{start}", feature_dim=int(np.prod(shape)))
    # float16: half the memory and disk of float32, and finer than the bf16 that training uses.
    cache = BottleneckCache(cache_dir, pseudo, dtype="float16", log=log)
    size, crop = bb.image_size, bb.crop_fraction

    def key(job):
        i, v = job
        return key_of(items[i].digest, "prefix" if v < 0 else "prefix|" + augment.variant(distortions, v))

    decoded = RecentDecodes()  # a photo's centre and views are side by side in `jobs`: decoded once
    draft = images.draft_for(size, crop)

    def loader(j):
        i, v = jobs[j]
        path = items[i].path
        im = decoded.get(path, lambda: images.open_image(path, draft_size=draft))
        if v < 0:
            return images.centre_view(im, size, crop, str(path))
        return augment.distort(im, size, crop, augment.view_params(items[i].digest, v, distortions))

    feats, _fails, timing = compute_cached(
        [key(j) for j in jobs], loader, lambda: OnnxEngine(make_session(prefix_onnx(bb, start, log=log),
                                                                          provider=provider)),
        cache, batch_size=batch_size, workers=workers, mean=bb.mean, std=bb.std,
        desc=desc, quiet=quiet, out_dtype=np.float16)
    return feats, shape, timing


# ------------------------------------------------------------------------ export

def fine_tuned_features_onnx(bb, result, path: Path) -> None:
    """The whole backbone with the fine-tuned tail (`result`: a retrain.finetune.FineTuneResult),
    exported (N,3,H,W) -> (N,C) to `path`; for kind concat, the tuned network (the first) beside
    the frozen others, their features concatenated as in the bottlenecks."""
    from retrain.features import export_onnx, feature_net

    net = feature_net(bb)
    tuned = (net.nets[0] if bb.kind == "concat" else net).net  # the EfficientNet inside the features module
    tail = make_tail(tuned, result.start)
    tail.load_state_dict({n: t.contiguous() for n, t in result.tail_state.items()})  # updates `tuned`
    export_onnx(net.eval(), path, bb.image_size)
