"""Distorted training views that can be cached like any bottleneck.

The codelab's distortions (--flip_left_right, --random_crop, --random_scale,
--random_brightness) drew new random numbers on every step, so nothing could be cached and
training ran the whole backbone per step. Here each training image gets N views (--augment N),
each view fully determined by (image digest, view index, distortion settings): the same view
is produced on every run, so its bottleneck is cached under key_of(digest, view.variant) and
computed once. Training then samples among the cached views. Validation and test images are
never distorted.

Meanings follow the codelab (retrain.py, add_input_distortions):
  random_crop   percent of margin: the kept box is 1 / (1 + crop/100) of the centre crop
  random_scale  percent of extra zoom: a further uniform(1, 1 + scale/100) factor
  random_brightness  pixels multiplied by uniform(1 - b/100, 1 + b/100)
  flip_left_right    mirrored with probability 1/2
The kept box is placed uniformly at random inside the usual centre crop.
Pillow and numpy only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from retrain.errors import ConfigError

# Bump when the way a view is made changes: every cached view gets a new key.
AUGMENT_SCHEMA = 1
DEFAULT_VIEWS = 4
MAX_VIEWS = 32


@dataclass(frozen=True)
class Distortions:
    """The codelab's distortion settings (percentages, as its flags take them)."""

    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0

    def __post_init__(self):
        for name in ("random_crop", "random_scale", "random_brightness"):
            v = getattr(self, name)
            if not (0 <= v <= 100) or v != v:
                raise ConfigError(f"--{name} is a percentage between 0 and 100, got {v}")

    @property
    def any(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale or self.random_brightness)

    def tag(self) -> str:
        """Canonical text of the settings: part of every view's cache key."""
        return (f"aug{AUGMENT_SCHEMA}:flip={int(bool(self.flip_left_right))}:crop={self.random_crop:g}"
                f":scale={self.random_scale:g}:bright={self.random_brightness:g}")

    @classmethod
    def from_config(cls, cfg) -> "Distortions":
        return cls(bool(cfg.flip_left_right), float(cfg.random_crop), float(cfg.random_scale),
                   float(cfg.random_brightness))


def resolve(cfg) -> tuple[Distortions, int]:
    """(distortions, views per training image) from a FitConfig; (none, 0) when none asked.

    --augment N alone means the standard mix (mirror, 10% crop, 10% scale, 10% brightness);
    a distortion flag alone means DEFAULT_VIEWS views.
    """
    d = Distortions.from_config(cfg)
    n = int(cfg.augment or 0)
    if n < 0 or n > MAX_VIEWS:
        raise ConfigError(f"--augment is the number of distorted views per training image, "
                          f"0 to {MAX_VIEWS}, got {n}")
    if n and not d.any:
        d = resolve_default()
    if d.any and not n:
        n = DEFAULT_VIEWS
    return d, n


def resolve_default() -> Distortions:
    """The standard mix: mirror, 10% crop margin, up to 10% zoom, +-10% brightness."""
    return Distortions(True, 10.0, 10.0, 10.0)


def variant(d: Distortions, view: int) -> str:
    """Cache variant of view `view` (use with retrain.bottlenecks.key_of(digest, variant))."""
    return f"{d.tag()}:view={view}"


def view_params(digest: str, view: int, d: Distortions) -> dict:
    """The random numbers of one view, derived from (digest, view, settings) only."""
    seed = hashlib.blake2b(f"{digest}|{variant(d, view)}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(seed, "little"))
    u = rng.random(5)
    margin = 1.0 + d.random_crop / 100.0
    scale = 1.0 + u[0] * d.random_scale / 100.0
    return {
        "keep": 1.0 / (margin * scale),  # side of the kept box, as a fraction of the centre crop
        "x": float(u[1]),  # position of the box inside the free space, 0..1
        "y": float(u[2]),
        "flip": bool(d.flip_left_right and u[3] < 0.5),
        "brightness": float(1.0 + (2 * u[4] - 1) * d.random_brightness / 100.0),
    }


def distort(im, size, crop_fraction: float, params: dict) -> np.ndarray:
    """Pillow RGB image -> uint8 (size, size, 3): a box of the centre crop, resized, flipped, brightened."""
    from PIL import Image

    from retrain.images import _wh

    ow, oh = _wh(size)
    w, h = im.size
    full = min(w / ow, h / oh) * crop_fraction  # source pixels per output pixel of the centre crop
    cw, ch = ow * full, oh * full
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    kw, kh = cw * params["keep"], ch * params["keep"]
    bx = x0 + (cw - kw) * params["x"]
    by = y0 + (ch - kh) * params["y"]
    out = im.resize((ow, oh), Image.Resampling.BICUBIC, box=(bx, by, bx + kw, by + kh))
    a = np.asarray(out, dtype=np.uint8)
    if params["flip"]:
        a = a[:, ::-1]
    if params["brightness"] != 1.0:
        a = np.clip(a.astype(np.float32) * params["brightness"] + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def load_view(path, digest: str, view: int, d: Distortions, size, crop_fraction: float) -> np.ndarray:
    """Decode `path` and make its view number `view`. Raises ImageError."""
    from retrain.images import draft_for, open_image

    im = open_image(path, draft_size=draft_for(size, crop_fraction))
    return distort(im, size, crop_fraction, view_params(digest, view, d))
