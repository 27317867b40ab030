"""The fixed encoder e and decoder d: the properties docs/method.md lists, and equality with the
plain reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minusface.dct import RGB_TO_YCBCR, dct_matrix, decode, encode
from tests.dct_reference import decode_ref, encode_ref


def _faces(n: int = 2, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g, dtype=dtype) * 2 - 1


def test_dct_basis_is_orthonormal():
    d = dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=d.dtype), atol=1e-12)
    basis = torch.einsum("um,vn->uvmn", d, d).reshape(64, 64)
    assert torch.allclose(basis @ basis.T, torch.eye(64, dtype=d.dtype), atol=1e-12)


def test_encoder_matches_reference_float64_and_float32():
    x64 = _faces(dtype=torch.float64)
    ref = encode_ref(x64)
    assert (encode(x64) - ref).abs().max() <= 1e-9 * ref.abs().max()
    # float32: compare with the exact (float64) reference of the same float32 input
    x32 = x64.float()
    ref = encode_ref(x32.double())
    err = (encode(x32).double() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"relative max error {err:.2e}"


def test_decoder_matches_reference_float64_and_float32():
    g = torch.Generator().manual_seed(1)
    c64 = torch.randn(2, 192, 112, 112, generator=g, dtype=torch.float64) * 20
    for clamp in (False, True):
        ref = decode_ref(c64, clamp=clamp)
        assert (decode(c64, clamp=clamp) - ref).abs().max() <= 1e-9 * ref.abs().max()
    c32 = c64.float()
    ref = decode_ref(c32.double(), clamp=False)
    err = (decode(c32, clamp=False).double() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"relative max error {err:.2e}"


def test_gradients_match_reference():
    x = _faces(1, dtype=torch.float64).requires_grad_()
    w = torch.randn(1, 192, 112, 112, dtype=torch.float64)
    (encode(x) * w).sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    (encode_ref(x) * w).sum().backward()
    assert torch.allclose(g_fast, x.grad, rtol=1e-9, atol=1e-9)
    c = (torch.randn(1, 192, 112, 112, dtype=torch.float64) * 5).requires_grad_()
    v = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    (decode(c, clamp=False) * v).sum().backward()
    g_fast = c.grad.clone()
    c.grad = None
    (decode_ref(c, clamp=False) * v).sum().backward()
    assert torch.allclose(g_fast, c.grad, rtol=1e-9, atol=1e-9)


def test_dc_is_eight_times_block_mean_and_constant_image_has_no_ac():
    x = _faces(1, dtype=torch.float64)
    up = F.interpolate(x * 0.5 + 0.5, scale_factor=8, mode="bilinear", align_corners=True) * 255
    y = torch.einsum("c,nchw->nhw", RGB_TO_YCBCR[0], up) - 128.0
    block_mean = F.avg_pool2d(y.unsqueeze(1), 8)[:, 0]
    assert torch.allclose(encode(x)[:, 0], 8 * block_mean, atol=1e-9)
    const = torch.full((1, 3, 112, 112), 0.3, dtype=torch.float64)
    coef = encode(const).view(1, 3, 64, 112, 112)
    assert coef[:, :, 1:].abs().max() < 1e-9          # every AC coefficient of every plane
    assert coef[:, :, 0].abs().max() > 1.0


def test_decoding_zero_is_uniform_mid_grey():
    out = decode(torch.zeros(1, 192, 112, 112))
    assert torch.allclose(out, torch.full_like(out, 128 / 255), atol=1e-6)


def test_decode_of_encode_is_close_to_identity_on_real_faces(lfw_root):
    from clients.data import load_image
    paths = sorted((lfw_root / "images").glob("A*/*_0001.jpg"))[:16]
    faces = torch.stack([load_image(p) for p in paths])
    back = decode(encode(faces)) * 2 - 1
    err = (back - faces).abs()
    print(f"\nd(e(X)) on {len(paths)} LFW faces, [-1, 1] units: mean {err.mean():.4f}, "
          f"max {err.max():.4f}")
    # bilinear up- then down-sampling smooths slightly: small but non-zero (docs/method.md, "Decoder d")
    assert 1e-4 < float(err.mean()) < 0.01      # measured 0.0017
    assert float(err.max()) < 0.15                # measured 0.058


def test_bad_shapes_are_rejected_with_a_clear_error():
    import pytest
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 112\)"):
        encode(torch.zeros(1, 1, 112, 112))
    with pytest.raises(ValueError, match=r"\(N, 192, 112, 112\)"):
        decode(torch.zeros(1, 192, 56, 56))
    with pytest.raises(TypeError):
        encode(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
