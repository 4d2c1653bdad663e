"""Broken images of every format Pillow writes: `load` returns a picture or raises ImageError.

Nothing else may escape it: `fit`, `label`, `evaluate` and `serve` treat ImageError as "this
image is bad" and go on; any other exception (Pillow's decoders raise TypeError, KeyError,
NotImplementedError, RuntimeError... on bytes they do not expect) stopped the whole command.
"""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from retrain import images
from retrain.errors import ImageError

Image.init()
WRITABLE = sorted(Image.SAVE)  # every format this Pillow can save (AVIF, BMP, DDS, GIF, ...)
# Formats a photo folder is likely to hold: the fuzz must cover them, not skip them quietly.
EXPECTED = {"BMP", "DDS", "GIF", "ICO", "JPEG", "PNG", "PPM", "TGA", "TIFF", "WEBP"}
MUTATIONS = 200  # per format, at most...
SECONDS = 0.3  # ...and for at most this long (ICNS decodes 1024-pixel icons: ~20 ms each)
SIZE, CROP = 16, 0.875
# Pillow warns about what it skips in a broken file ("Tag data larger than file") and that the
# IM format is deprecated: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def _sample(fmt: str) -> bytes | None:
    """A small image saved as `fmt` that `load` reads back, or None (e.g. EPS needs Ghostscript,
    PDF is write-only, BUFR/GRIB/HDF5/WMF need plugins that are not installed)."""
    # TIFF: greyscale and deflate-compressed, where its decoder has the most ways to fail.
    modes = ("L",) if fmt == "TIFF" else ("RGB", "RGBA", "L", "P", "1")
    for mode in modes:
        buf = io.BytesIO()
        try:
            _picture().convert(mode).save(buf, fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))
            images.load(buf.getvalue(), SIZE, CROP)
        except Exception:
            continue
        return buf.getvalue()
    return None


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flipped bits, a truncation, a duplicated chunk or overwritten bytes."""
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(1, len(b)):]
    elif kind == 2:
        i = rng.randrange(len(b))
        chunk = b[i:i + rng.randint(1, 64)]
        k = rng.randrange(len(b))
        b[k:k] = chunk
    else:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(b)


def _loads_or_refuses(data: bytes) -> None:
    """The contract: a uint8 (H, W, 3) array, or ImageError. Anything else fails the test."""
    try:
        a = images.load(data, SIZE, CROP)
    except ImageError:
        return
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)


def test_the_fuzz_covers_the_formats_of_real_photo_folders():
    covered = {fmt for fmt in EXPECTED if fmt in WRITABLE and _sample(fmt) is not None}
    assert covered == EXPECTED


@pytest.mark.parametrize("fmt", WRITABLE)
def test_mutated_images_load_or_raise_image_error(fmt):
    data = _sample(fmt)
    if data is None:
        pytest.skip(f"{fmt}: Pillow here cannot write an image that it reads back")
    rng = random.Random(f"retrain-fuzz-{fmt}")
    deadline = time.perf_counter() + SECONDS
    for n in range(MUTATIONS):
        if time.perf_counter() > deadline:
            break
        seed = rng.randrange(1 << 32)
        mutated = _mutate(data, random.Random(seed))
        try:
            _loads_or_refuses(mutated)
        except Exception as e:  # say which input, so that it can be replayed
            raise AssertionError(f"{fmt} mutation {n} (seed {seed}): {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- pinned cases that escaped before


def _tiff_with_a_second_frame_without_size() -> bytes:
    """A valid 2x2 greyscale TIFF whose 'next frame' pointer leads to a frame with no width or
    height. Pillow counts frames to pick the first one and raised TypeError('Missing dimensions')."""
    def ifd(entries, next_offset):
        out = struct.pack("<H", len(entries))
        for tag, typ, value in entries:
            out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", value, 0) if typ == 3
                                                       else struct.pack("<I", value))
        return out + struct.pack("<I", next_offset)

    short, long_ = 3, 4
    pixels = bytes([0, 80, 160, 240])
    first = 8
    n_first = 9
    second = first + 2 + 12 * n_first + 4
    strip = second + 2 + 12 * 1 + 4
    ifd0 = ifd([(256, short, 2), (257, short, 2), (258, short, 8), (259, short, 1), (262, short, 1),
                (273, long_, strip), (277, short, 1), (278, short, 2), (279, long_, len(pixels))], second)
    ifd1 = ifd([(262, short, 1)], 0)  # PhotometricInterpretation only: no ImageWidth/ImageLength
    return b"II*\x00" + struct.pack("<I", first) + ifd0 + ifd1 + pixels


def _dds_with_no_pixel_format_flags() -> bytes:
    """An uncompressed RGB DDS with its pixel format flags zeroed (offset 80: 'DDS ', then the
    DDS_HEADER's size, flags, height, width, pitch, depth, mipmaps, 11 reserved words, and the
    DDS_PIXELFORMAT's size). Pillow raised NotImplementedError('Unknown pixel format flags 0')."""
    buf = io.BytesIO()
    _picture().save(buf, "DDS")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"DDS " and struct.unpack_from("<I", data, 76)[0] == 32  # DDS_PIXELFORMAT size
    struct.pack_into("<I", data, 80, 0)
    return bytes(data)


PINNED = {"tif": (_tiff_with_a_second_frame_without_size, "cannot decode (TypeError: Missing dimensions)"),
          "dds": (_dds_with_no_pixel_format_flags,
                  "cannot decode (NotImplementedError: Unknown pixel format flags 0)")}


@pytest.mark.parametrize("ext", sorted(PINNED))
def test_pinned_decoder_errors_become_image_errors(ext, tmp_path):
    make, reason = PINNED[ext]
    p = tmp_path / f"bad.{ext}"
    p.write_bytes(make())
    with pytest.raises(ImageError) as e:
        images.load(p, SIZE, CROP)
    assert str(e.value) == f"{p}: {reason}"
    with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        images.load(p.read_bytes(), SIZE, CROP)


def test_label_reports_a_broken_tiff_and_dds_without_a_traceback(tiny_run, tmp_path):
    # Before: `retrain label` stopped on the first of them with a TypeError traceback.
    good = tmp_path / "good.png"
    _picture().save(good)
    bad = []
    for ext, (make, _reason) in sorted(PINNED.items()):
        bad.append(tmp_path / f"bad.{ext}")
        bad[-1].write_bytes(make())
    p = run_cli("label", tiny_run, good, *bad, "-q", timeout=120)
    assert "Traceback" not in p.stderr
    assert f"skipped {bad[0]}: cannot decode (NotImplementedError" in p.stderr
    assert f"skipped {bad[1]}: cannot decode (TypeError: Missing dimensions)" in p.stderr
    assert str(good) in p.stdout
    one = run_cli("label", tiny_run, bad[1], check=False, timeout=120)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert one.stderr.strip() == f"error: {bad[1]}: cannot decode (TypeError: Missing dimensions)"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmSize from Linux's /proc")
def test_an_image_too_large_for_the_memory_left_is_an_image_error(tmp_path):
    # 7000 x 8000 pixels of one grey (70 KB as PNG, under the 64 MP limit) with ~20 MB of address
    # space left: the decoder's MemoryError is this image's problem, not the program's.
    p = tmp_path / "big.png"
    Image.new("L", (7000, 8000), 7).save(p)
    code = """if True:
        import resource, sys
        from retrain import images
        from retrain.errors import ImageError
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (20 << 20), vm + (20 << 20)))
        try:
            images.load(sys.argv[1], 16, 0.875)
        except ImageError as e:
            print(e)
        """
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"{p}: too large to decode", r.stderr
