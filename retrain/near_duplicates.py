"""Near duplicates for `retrain check` (retrain.check): each image decoded small (JPEG draft
mode), its true size and perceptual hash (pHash from the `imagehash` package), and the groups
of images whose hashes differ in at most a few bits (Hamming distance), exact copies left out.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

MAX_PAIRS = 1_000_000  # near-duplicate pairs kept before the search stops (memory bound)


def inspect_image(path: str):
    """(width, height, phash as uint64) of one image, or an error reason. Decodes small (draft)."""
    import imagehash
    from PIL import Image

    from retrain.errors import ImageError
    from retrain.images import open_image

    try:
        im = open_image(path, draft_size=64)  # raises ImageError with the reason
        with Image.open(path) as raw:  # the true size, before draft scaling
            w, h = raw.size
        if w != h and (im.width > im.height) != (w > h):  # EXIF rotation by 90 degrees
            w, h = h, w
        hv = imagehash.phash(im, hash_size=8)
        bits = np.packbits(hv.hash.ravel().astype(np.uint8))
        return w, h, int.from_bytes(bits.tobytes(), "big"), None
    except ImageError as e:
        reason = str(e)
        prefix = f"{path}: "
        return None, None, None, reason[len(prefix):] if reason.startswith(prefix) else reason
    except Exception as e:  # Pillow raises many types on broken files; all mean "cannot read"
        return None, None, None, f"{type(e).__name__}: {e}"


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(-1, dtype=np.uint8)


def near_groups(paths, hashes, digests, labels, max_distance):
    """Groups of images whose pHashes differ in at most `max_distance` bits (not exact copies)."""
    n = len(paths)
    if n < 2:
        return [], False
    h = np.array(hashes, dtype=np.uint64)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pair_dist = []  # (i, j, distance) for i < j, different bytes
    truncated = False
    chunk = max(1, 4_000_000 // n)  # bound memory: chunk x n distances at a time
    for s0 in range(0, n, chunk):
        block = h[s0:s0 + chunk]
        d = _popcount(block[:, None] ^ h[None, :])  # (chunk, n) Hamming distances
        rows = np.arange(s0, s0 + len(block))[:, None]
        ii, jj = np.nonzero((d <= max_distance) & (np.arange(n)[None, :] > rows))
        for i, j in zip(ii + s0, jj):
            if digests[i] != digests[j]:
                pair_dist.append((int(i), int(j), int(d[i - s0, j])))
        if len(pair_dist) > MAX_PAIRS:  # e.g. thousands of near-blank frames: stop, say so
            truncated = True
            break
    for i, j, _ in pair_dist:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
    widest = defaultdict(int)  # group root -> largest distance inside it
    for i, j, dist in pair_dist:
        r = find(i)
        widest[r] = max(widest[r], dist)
    groups = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    out = []
    for root, members in groups.items():
        if len(members) < 2 or len({digests[i] for i in members}) < 2:
            continue
        dist = widest[root]
        classes = sorted({labels[i] for i in members})
        out.append({"paths": sorted(paths[i] for i in members), "classes": classes,
                    "cross_class": len(classes) > 1, "distance": dist})
    return sorted(out, key=lambda g: (not g["cross_class"], g["paths"][0])), truncated
