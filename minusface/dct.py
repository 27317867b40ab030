"""The fixed encoder e and decoder d of MinusFace, computed without 896x896 images
(docs/method.md, "Encoder e" and "Decoder d").

e(X): 8x bilinear up-sampling (align_corners=True), JPEG full-range YCbCr minus 128 on every
channel, orthonormal 8x8 block DCT, coefficient (u, v) of colour plane c written to channel
c*64 + 8u + v.  d is the inverse: block IDCT, +128, YCbCr->RGB, bilinear 1/8 down-sampling
(align_corners=True), clamp to [0, 1].

Why this is exact and cheap: the colour transform is affine per pixel and every bilinear weight row
sums to one, so colour conversion commutes with resampling and can be done at 112x112.  What is
left is separable and linear per plane: e = M Y M^T with M = blockDCT @ Upsample (896x112) and
d = P C P^T with P = Downsample @ blockIDCT (112x896).  Both matrices are banded: the 8 rows of
block i of M read at most 3 neighbouring source pixels, and each row of P reads at most 2
neighbouring 8-coefficient blocks.  We store only those bands and apply them as three shifted
slices (e) and a per-block contraction (d), so the work is proportional to the 192x112x112
tensor itself (memory bound).
The banded weights are taken from torch's own interpolation kernels (interpolating identity
matrices in float64), so the resampling matches `F.interpolate` to rounding.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

SIZE = 112          # face side in pixels
BLOCK = 8           # DCT block side and up-sampling factor
CHANNELS = 3 * BLOCK * BLOCK   # 192

# JPEG full-range colour conversion (ITU-T T.871), not BT.601 studio range.
RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114],
     [-0.168736, -0.331264, 0.5],
     [0.5, -0.418688, -0.081312]], dtype=torch.float64)
YCBCR_TO_RGB = torch.tensor(
    [[1.0, 0.0, 1.402],
     [1.0, -0.344136, -0.714136],
     [1.0, 1.772, 0.0]], dtype=torch.float64)


def dct_matrix(n: int = BLOCK, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix, rows = frequencies (D @ D.T = I)."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype)


def _linear_resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of torch's 1-D linear interpolation with align_corners=True."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)          # (1, n_in channels, n_in)
    out = F.interpolate(eye, size=n_out, mode="linear", align_corners=True)
    return out[0].T.contiguous()


@cache
def _bands() -> dict[str, torch.Tensor]:
    """Banded factors of the encoder and decoder, float64 on CPU (cached, tiny)."""
    d = dct_matrix()
    blockdct = torch.block_diag(*([d] * SIZE))                       # (896, 896)
    up = _linear_resample_matrix(SIZE, SIZE * BLOCK)                  # (896, 112)
    down = _linear_resample_matrix(SIZE * BLOCK, SIZE)                # (112, 896)

    # Encoder: rows 8i..8i+7 of M = blockdct @ up read source pixels start_i .. start_i+2.
    enc = blockdct @ up                                               # (896, 112)
    used = (up != 0).view(SIZE, BLOCK, SIZE).any(dim=1)               # (block, source pixel)
    taps_e = int(used.sum(dim=1).max())
    assert taps_e <= 3, taps_e
    start = used.float().argmax(dim=1).clamp(max=SIZE - taps_e)       # first source pixel per block
    idx_e = start[:, None] + torch.arange(taps_e)[None, :]            # (112, taps)
    w_e = torch.gather(enc.view(SIZE, BLOCK, SIZE), 2,
                       idx_e[:, None, :].expand(SIZE, BLOCK, taps_e))   # (block i, freq u, tap)
    # The same band by offset from the block's own pixel: block i reads source pixels i-1, i, i+1
    # (0.99218 i <= source coordinate <= 0.99218 i + 0.868), so e is three shifted slices of a
    # zero-padded plane, with no gather: shift_e[o, u, i] weighs source pixel i + o - 1.
    shift_e = torch.zeros(3, BLOCK, SIZE, dtype=torch.float64)
    for t in range(taps_e):
        offset = idx_e[:, t] - torch.arange(SIZE)                      # per block
        live = w_e[:, :, t].abs().amax(dim=1) > 0
        assert bool(((offset[live] >= -1) & (offset[live] <= 1)).all()), "encoder band > 3 wide"
        for o in (-1, 0, 1):
            sel = live & (offset == o)
            shift_e[o + 1][:, sel] += w_e[sel, :, t].T
    assert torch.allclose(torch.einsum("oui->iu", shift_e), torch.einsum("iut->iu", w_e))

    # Decoder: output pixel p of the 1/8 down-sampling reads 896-grid rows floor(p*895/111) and
    # the next one; both always lie in coefficient block p (the offset inside the block is
    # floor(p*7/111) <= 7 and the second weight is 0 at p = 111), so P is block-diagonal:
    # row p of P = down @ blockdct.T is non-zero only on the 8 frequencies of block p.
    dec = down @ blockdct.T                                           # (112, 896)
    dec_blocks = dec.view(SIZE, SIZE, BLOCK)                          # (p, block, freq)
    off_block = dec_blocks.clone()
    off_block[torch.arange(SIZE), torch.arange(SIZE)] = 0.0
    assert float(off_block.abs().max()) == 0.0, "decoder band left block p"
    w_d = dec_blocks[torch.arange(SIZE), torch.arange(SIZE)]         # (p, freq u)
    return {"shift_e": shift_e, "w_d": w_d, "enc": enc, "dec": dec}


@cache
def _bands_on(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    b = _bands()
    w_d = b["w_d"].T.contiguous()                                     # (u, p)
    fwd = RGB_TO_YCBCR * 255.0                                        # acts on [0, 1] RGB
    inv = YCBCR_TO_RGB / 255.0
    return (b["shift_e"].to(device, dtype), w_d.to(device, dtype),
            fwd.to(device, dtype), inv.to(device, dtype))


def _colour(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("kc,nchw->nkhw", matrix, x)


def _check(x: torch.Tensor, channels: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2:] != (SIZE, SIZE):
        raise ValueError(f"{name}: expected a tensor of shape (N, {channels}, {SIZE}, {SIZE}), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def encode(img: torch.Tensor) -> torch.Tensor:
    """e: faces (N, 3, 112, 112) in [-1, 1] -> raw DCT coefficients (N, 192, 112, 112).

    Always float32 or better, also inside an autocast region: the Y plane spans 0..255 and
    bf16 keeps 8 bits of mantissa, so a bf16 colour transform would be off by whole grey levels."""
    _check(img, 3, "encode")
    with torch.autocast(img.device.type, enabled=False):
        return _encode(_full_precision(img))


def _encode(img: torch.Tensor) -> torch.Tensor:
    w, _, fwd, _ = _bands_on(img.device, img.dtype)                   # w: (offset, u, block)
    n = img.shape[0]
    ycc = _colour(img * 0.5 + 0.5, fwd)
    ycc = ycc - torch.tensor([128.0, 0.0, 0.0], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    # Rows: rows[n, c, u, i, w] = sum_o w[o, u, i] * ycc[n, c, i + o - 1, w]  (zero outside)
    p = F.pad(ycc, (0, 0, 1, 1)).unsqueeze(2)                         # (n, 3, 1, 114, 112)
    rows = (p[:, :, :, 0:SIZE] * w[0].view(1, 1, BLOCK, SIZE, 1)
            + p[:, :, :, 1:SIZE + 1] * w[1].view(1, 1, BLOCK, SIZE, 1)
            + p[:, :, :, 2:SIZE + 2] * w[2].view(1, 1, BLOCK, SIZE, 1))
    # Columns: out[n, c, u, v, i, j] = sum_o w[o, v, j] * rows[n, c, u, i, j + o - 1]
    q = F.pad(rows, (1, 1)).unsqueeze(3)                              # (n, 3, 8, 1, 112, 114)
    out = q[..., 0:SIZE] * w[0].view(1, 1, 1, BLOCK, 1, SIZE)
    for o in (1, 2):
        out.addcmul_(q[..., o:o + SIZE], w[o].view(1, 1, 1, BLOCK, 1, SIZE))
    return out.reshape(n, CHANNELS, SIZE, SIZE)


def decode(coef: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """d: DCT coefficients (N, 192, 112, 112) -> RGB (N, 3, 112, 112) in [0, 1] (clamped).

    Like `encode`, always float32 or better, also inside an autocast region."""
    _check(coef, CHANNELS, "decode")
    with torch.autocast(coef.device.type, enabled=False):
        return _decode(_full_precision(coef), clamp)


def _decode(coef: torch.Tensor, clamp: bool) -> torch.Tensor:
    _, w, _, inv = _bands_on(coef.device, coef.dtype)
    out = _DecodePlanes.apply(coef, w)
    out = out + torch.tensor([128.0, 0.0, 0.0], device=coef.device, dtype=coef.dtype).view(1, 3, 1, 1)
    rgb = _colour(out, inv)
    return rgb.clamp(0.0, 1.0) if clamp else rgb


def _decode_planes(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Block IDCT + 1/8 down-sampling per colour plane: (N, 192, 112, 112) -> (N, 3, 112, 112)."""
    n = coef.shape[0]
    c6 = coef.reshape(n, 3, BLOCK, BLOCK, SIZE, SIZE)                 # (n, c, u, v, i, j)
    # Rows: rows[n, c, v, p, j] = sum_u w[u, p] * c6[n, c, u, v, p, j]   (block p only)
    rows = c6[:, :, 0] * w[0].view(1, 1, 1, SIZE, 1)
    for u in range(1, BLOCK):
        rows.addcmul_(c6[:, :, u], w[u].view(1, 1, 1, SIZE, 1))
    # Columns: out[n, c, p, q] = sum_v w[v, q] * rows[n, c, v, p, q]
    out = rows[:, :, 0] * w[0]
    for v in range(1, BLOCK):
        out.addcmul_(rows[:, :, v], w[v])
    return out


class _DecodePlanes(torch.autograd.Function):
    """`_decode_planes` with its adjoint as the backward.

    Autograd through the 16 slices of the forward would give each slice a zero-filled gradient
    of the whole input and add them up: 8 fills and 8 adds of the 192-channel tensor per call
    (stage 1 back-propagates L_gen through d).  The adjoint writes that gradient once:
    grad[n, c, u, v, p, q] = w[u, p] * w[v, q] * g[n, c, p, q]."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return _decode_planes(coef, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        n = grad_out.shape[0]
        grad_rows = grad_out.unsqueeze(2) * w.view(1, 1, BLOCK, 1, SIZE)       # (n, c, v, p, q)
        grad = grad_rows.unsqueeze(2) * w.view(1, 1, BLOCK, 1, SIZE, 1)        # (n, c, u, v, p, q)
        return grad.reshape(n, CHANNELS, SIZE, SIZE), None


def decoded_to_signed(img01: torch.Tensor) -> torch.Tensor:
    """Map a decoded image from [0, 1] to the [-1, 1] range of the input faces (for L_gen)."""
    return img01 * 2.0 - 1.0
