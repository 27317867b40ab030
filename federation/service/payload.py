"""Request bodies the recognition service accepts: X_p only, parsed strictly.

Two formats (docs/service.md):

* ``application/x-npy``: one NumPy .npy file (format 1.0/2.0/3.0), dtype float16 or float32
  (little-endian), C order, values in [0, 1] and finite.  The header is parsed with
  `numpy.lib.format` (never `allow_pickle`), the shape and dtype are checked before the data is
  read, and the data must be exactly the bytes the header promises.
* ``image/png``: one lossless 8-bit RGB PNG of 112x112 (X_p as `minusfed protect` writes it),
  read as value / 255.  Its size is checked from the header before any pixel is decoded.

Shapes: one face is (3, 112, 112) or (V, 3, 112, 112) with V in {1, 2} views (the X_p of the
face and of its mirror image: their f_p outputs are summed, as the run's server-side evaluation
does); `embed` takes a batch (N, 3, 112, 112) or (N, V, 3, 112, 112).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from numpy.lib import format as npy

XP_SHAPE = (3, 112, 112)
MAX_VIEWS = 2
DTYPES = {np.dtype("<f2"), np.dtype("<f4")}
NPY, PNG = "application/x-npy", "image/png"
RANGE_SLACK = 1e-3          # float16 rounding of a value in [0, 1]


class PayloadError(ValueError):
    """A body that is not X_p in an accepted format; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_npy(body: bytes) -> np.ndarray:
    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(stream)
        else:
            raise PayloadError(f"unsupported .npy version {version}")
    except PayloadError:
        raise
    except (ValueError, EOFError) as e:
        raise PayloadError(f"body is not a .npy file ({e})") from None
    if dtype not in DTYPES:
        raise PayloadError(f"dtype {dtype.str} not accepted: X_p must be float16 or float32 "
                           "(little-endian)")
    if fortran:
        raise PayloadError("Fortran-order arrays are not accepted: send C order")
    count = math.prod(shape)
    data = body[stream.tell():]
    if len(data) != count * dtype.itemsize:
        raise PayloadError(f".npy header promises shape {shape} ({count * dtype.itemsize} "
                           f"bytes) but the body holds {len(data)} data bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def npy_bytes(x: np.ndarray) -> bytes:
    """`x` as a .npy file (never pickled): the embed reply for `Accept: application/x-npy`."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def parse_png(body: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(body))
        if im.format != "PNG":
            raise PayloadError(f"body is a {im.format} image; only PNG (lossless) is accepted")
        if im.size != XP_SHAPE[1:][::-1]:
            raise PayloadError(f"PNG is {im.size[0]}x{im.size[1]}; X_p is 112x112")
        if im.mode != "RGB":
            raise PayloadError(f"PNG mode {im.mode}; X_p is 8-bit RGB")
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except PayloadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise PayloadError(f"body is not a readable PNG ({type(e).__name__})") from None
    return (arr / 255.0).transpose(2, 0, 1)[None]


def parse_body(body: bytes, content_type: str | None) -> np.ndarray:
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == NPY:
        return parse_npy(body)
    if kind == PNG:
        return parse_png(body)
    raise PayloadError(f"Content-Type {content_type!r} not accepted: send {NPY} (float16/float32 "
                       f"X_p) or {PNG}", status=415)


def _checked_tensor(x: np.ndarray) -> torch.Tensor:
    """float32 copy of `x`, refused unless finite and in [0, 1].  One conversion pass, then
    NumPy's float32 min/max (NaN and infinities propagate into them).  Not NumPy on float16
    (several times slower) and not torch's reductions: those open an OpenMP parallel region
    whose thread wake-up, on a busy machine, costs milliseconds for a few microseconds of work."""
    a = np.array(x, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise PayloadError("X_p holds NaN or infinite values")
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise PayloadError(f"X_p values must lie in [0, 1] (protect() output), got "
                           f"[{lo:.3g}, {hi:.3g}]")
    return torch.from_numpy(a)


def face_views(x: np.ndarray) -> torch.Tensor:
    """One face: (V, 3, 112, 112) float32 views from (3, 112, 112) or (V, 3, 112, 112)."""
    if x.shape == XP_SHAPE:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != XP_SHAPE or not 1 <= x.shape[0] <= MAX_VIEWS:
        raise PayloadError(f"shape {tuple(x.shape)} not accepted: one face is (3, 112, 112) or "
                           f"(V, 3, 112, 112) with V = 1 or 2 views (face, mirror)")
    return _checked_tensor(x)


def batch_views(x: np.ndarray, max_faces: int) -> torch.Tensor:
    """A batch: (N, V, 3, 112, 112) float32 from (N, 3, 112, 112) or (N, V, 3, 112, 112)."""
    if x.ndim == 4 and x.shape[1:] == XP_SHAPE:
        x = x[:, None]
    if x.ndim != 5 or x.shape[2:] != XP_SHAPE or not 1 <= x.shape[1] <= MAX_VIEWS:
        raise PayloadError(f"shape {tuple(x.shape)} not accepted: a batch is (N, 3, 112, 112) or "
                           f"(N, V, 3, 112, 112) with V = 1 or 2 views")
    if not 1 <= x.shape[0] <= max_faces:
        raise PayloadError(f"batch of {x.shape[0]} faces; this service embeds 1..{max_faces} "
                           "per request")
    return _checked_tensor(x)
