"""Decoding every kind of photo a person might have, and refusing the ones that are not photos."""

import io

import numpy as np
import pytest
from PIL import Image

from retrain import images
from retrain.errors import ImageError


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_exif_rotation_is_applied(tmp_path):
    # A 60x30 landscape picture stored with EXIF orientation 6 (rotate 90 CW to view): portrait.
    im = Image.new("RGB", (60, 30), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(im, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = images.open_image(p)
    assert out.size == (30, 60)
    a = np.asarray(out)
    assert a[5, 15, 2] > 200 and a[55, 15, 0] > 200  # blue on top after rotation, red below


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    im = Image.new("RGB", (40, 40), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    p = _save(im, tmp_path / f"x.{fmt.lower()}", format=fmt)
    arr = images.load(p, 32, 0.875)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_16_bit_greyscale_keeps_its_range(tmp_path):
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    p = _save(im, tmp_path / "deep.png")
    out = np.asarray(images.open_image(p))
    assert out.shape == (64, 64, 3)
    assert out.min() < 10 and out.max() > 245  # not clipped to white or black


def test_transparent_png_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    out = np.asarray(images.open_image(_save(im, tmp_path / "t.png")))
    assert out.min() == 255


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    out = np.asarray(images.open_image(p))
    assert out[10, 10, 0] > 200 and out[10, 10, 1] < 50


def test_truncated_jpeg_is_refused_with_reason(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        images.load(p, 32, 0.875)


@pytest.mark.parametrize("content", [b"", b"hello, not an image", b"\xff\xd8\xff\xe0garbage"])
def test_non_images_are_refused(tmp_path, content):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError):
        images.load(p, 32, 0.875)


def test_decompression_bomb_is_refused(tmp_path):
    # 9000 x 8000 = 72 MP of one colour: a few KB as PNG, over the 64 MP bound.
    p = _save(Image.new("L", (9000, 8000)), tmp_path / "bomb.png")
    assert p.stat().st_size < 200_000
    with pytest.raises(ImageError, match="decompression bomb"):
        images.load(p, 32, 0.875)
    with pytest.raises(ImageError, match="over the limit"):
        images.load(p.read_bytes(), 32, 0.875, max_pixels=1000)


def test_centre_crop_keeps_the_middle(tmp_path):
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 50:150] = 255  # white centre square, black sides
    out = images.center_crop_resize(Image.fromarray(a), 32, 1.0)
    assert out.shape == (32, 32, 3) and out[:, 1:-1].min() > 240  # bicubic rings only at the edge


def test_non_square_output(tmp_path):
    p = _save(Image.new("RGB", (300, 200), (10, 20, 30)), tmp_path / "r.png")
    assert images.load(p, (64, 32), 0.875).shape == (32, 64, 3)


def test_normalize_layout_and_values():
    batch = np.full((2, 4, 4, 3), 255, np.uint8)
    x = images.normalize(batch, 127.0, 128.0)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x, 1.0)


def test_float_image_with_nan_and_infinite_pixels_keeps_its_range(tmp_path):
    # Before: one NaN made the scale NaN, so every pixel was cast from NaN (undefined; black here).
    a = np.linspace(0, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    a[:8, :8] = np.nan
    a[:8, 8:16] = np.inf
    a[:8, 16:24] = -np.inf
    p = _save(Image.fromarray(a, "F"), tmp_path / "float.tif")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "invalid value encountered in cast"
        out = np.asarray(images.open_image(p))
    assert out.shape == (64, 64, 3)
    assert out[:8, :24].max() == 0  # not-a-number pixels are black...
    assert out[-1, -1].min() > 245 and out[32, 32].min() > 100  # ...and the rest keeps its range
