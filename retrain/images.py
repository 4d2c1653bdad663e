"""Reading photos: decode, orient, convert to RGB, bound the size, centre-crop and resize.

One function (`load`) is used for training, labelling, evaluation and serving, so that
preprocessing can never drift between them. Pillow only; no torch.
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager

import numpy as np

from retrain.errors import ImageError

# A photo larger than this many pixels is refused (a "decompression bomb": a tiny file that
# decodes to gigabytes). 64 MP covers every phone and most DSLR photos.
MAX_PIXELS = int(os.environ.get("RETRAIN_MAX_PIXELS", 64_000_000))

_EXTENSIONS: frozenset[str] | None = None


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with dot) that Pillow can open."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        from PIL import Image

        Image.init()
        # PostScript and PDF are not photos, and Pillow renders them by running Ghostscript on
        # the file: never on a user's files.
        _EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                                if fmt not in ("EPS", "PDF"))
    return _EXTENSIONS


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def _to_rgb(im):
    """Any Pillow mode (L, P, RGBA, CMYK, I;16, I, F, LA, ...) to 8-bit RGB."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Wide greyscale: scale the actual range to 0..255 rather than clipping it.
        # NaN or infinite pixels (a float image, a broken file): black, not a NaN scale for all.
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as a viewer would show them.
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _reason(e: Exception) -> str:
    """What went wrong while opening or decoding an image, in words, from the exception."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb ({e})"
    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
        msg = str(e) or type(e).__name__
        return "image file is truncated" if "truncated" in msg else msg
    # Any other type (TypeError, KeyError, NotImplementedError, RuntimeError...): a decoder met
    # bytes it did not expect. It is this image's problem, never the caller's.
    return f"cannot decode ({type(e).__name__}: {e})" if str(e) else f"cannot decode ({type(e).__name__})"


@contextmanager
def _image_errors(name):
    """Inside: any exception from opening or decoding the image `name` becomes its ImageError.
    KeyboardInterrupt and SystemExit pass (they are not Exceptions); MemoryError is the image's
    fault too (a header that asks for a huge buffer)."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"{name}: too large to decode") from None
    except Exception as e:
        raise ImageError(f"{name}: {_reason(e)}") from None


def _name(source) -> str:
    return source if isinstance(source, (str, os.PathLike)) else "<bytes>"


def open_image(source, *, draft_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Open a path or bytes as an RGB Pillow image, EXIF orientation applied.

    draft_size: for JPEG, let the decoder scale down by 1/2, 1/4 or 1/8 while keeping both
    sides at least this large (DCT-domain scaling: much faster than decoding full size).
    Raises ImageError with the reason for anything that is not a readable image, whatever
    the decoder raised.
    """
    name = _name(source)
    with _image_errors(name):
        return _decode(source, name, draft_size, max_pixels)


def _decode(source, name, draft_size, max_pixels):
    from PIL import Image, ImageOps

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(fp)
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
            f"(possible decompression bomb); set RETRAIN_MAX_PIXELS to allow larger images"
        )
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # GIF/WebP/TIFF animations: first frame
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of every upright photo
    return _to_rgb(im)


def _wh(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def center_crop_resize(im, size, crop_fraction: float) -> np.ndarray:
    """Centre crop (`crop_fraction` of the short side, at the output's aspect), resized bicubic.

    size: an int (square) or (width, height). One resample straight from the crop box, no
    intermediate image. Returns uint8 (height, width, 3).
    """
    from PIL import Image

    ow, oh = _wh(size)
    w, h = im.size
    scale = min(w / ow, h / oh) * crop_fraction  # source pixels per output pixel
    cw, ch = ow * scale, oh * scale
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    out = im.resize((ow, oh), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def load(source, size, crop_fraction: float, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Path or bytes -> uint8 (H, W, 3) ready for `normalize`. Raises ImageError."""
    # Draft so that the crop still has at least `size` pixels: no loss of detail.
    im = open_image(source, draft_size=draft_for(size, crop_fraction), max_pixels=max_pixels)
    return centre_view(im, size, crop_fraction, _name(source))


def draft_for(size, crop_fraction: float) -> int:
    """The JPEG draft size for a view of `size` (so that the crop still has at least `size` pixels)."""
    return int(np.ceil(max(_wh(size)) / crop_fraction))


def centre_view(im, size, crop_fraction: float, name: str) -> np.ndarray:
    """An opened image's centre crop, resized (center_crop_resize); its errors as ImageError."""
    with _image_errors(name):  # resampling can still meet a bad image (e.g. a lazy tile)
        return center_crop_resize(im, size, crop_fraction)


def normalize(batch: np.ndarray, mean: float | list, std: float | list) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), (pixel - mean) / std, in 0..255 units."""
    x = batch.astype(np.float32)
    x -= np.asarray(mean, np.float32).reshape(-1)
    x *= 1.0 / np.asarray(std, np.float32).reshape(-1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
