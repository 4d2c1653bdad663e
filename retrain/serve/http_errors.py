"""What a refused request gets: `ApiError` -> {"error": {"code", "message"}} with a 4xx/5xx status.

Also the mapping of a decoder's failures (retrain.images' ImageError, or whatever a Pillow
plugin raises on a malformed file) to the 4xx that names the problem.
"""

from __future__ import annotations

from retrain.errors import ImageError


class ApiError(Exception):
    """A request problem: becomes {"error": {"code", "message"}} with this HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def image_error(e: ImageError, name: str | None = None) -> ApiError:
    """An ImageError from images.load -> a 4xx naming the problem (413 for pixel bombs)."""
    msg = str(e).removeprefix("<bytes>: ")
    if name:
        msg = f"{name}: {msg}"
    low = msg.lower()
    if "decompression bomb" in low or "over the limit" in low:
        return ApiError(413, "image_too_large", msg)
    if "truncated" in low:
        return ApiError(422, "truncated_image", msg)
    if "not an image" in low:
        return ApiError(422, "not_an_image", msg)
    return ApiError(422, "bad_image", msg)


def decoder_error(e: Exception, name: str | None = None) -> ApiError:
    """Any other exception out of a decoder (Pillow's plugins raise TypeError, struct.error,
    NotImplementedError... on malformed files) -> 422 for that image, never a 500."""
    detail = str(e)[:200] or type(e).__name__
    return ApiError(422, "bad_image", f"{name + ': ' if name else ''}the image could not be decoded "
                                      f"({type(e).__name__}: {detail})")
