"""Plain reference of e and d, step by step as docs/method.md describes them (materializes
896x896)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minusface.dct import RGB_TO_YCBCR, YCBCR_TO_RGB, dct_matrix


def _basis(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    d = dct_matrix()
    return torch.einsum("um,vn->uvmn", d, d).reshape(64, 1, 8, 8).to(device, dtype)


def encode_ref(img: torch.Tensor) -> torch.Tensor:
    x = img * 0.5 + 0.5
    x = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=True) * 255.0
    m = RGB_TO_YCBCR.to(img.device, img.dtype)
    ycc = torch.einsum("kc,nchw->nkhw", m, x)
    ycc = ycc + torch.tensor([0.0, 128.0, 128.0], dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    ycc = ycc - 128.0
    basis = _basis(img.dtype, img.device)
    planes = [F.conv2d(ycc[:, c:c + 1], basis, stride=8) for c in range(3)]
    return torch.cat(planes, dim=1)


def decode_ref(coef: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    basis = _basis(coef.dtype, coef.device)
    planes = [F.conv_transpose2d(coef[:, c * 64:(c + 1) * 64], basis, stride=8) for c in range(3)]
    ycc = torch.cat(planes, dim=1) + 128.0
    ycc = ycc - torch.tensor([0.0, 128.0, 128.0], dtype=coef.dtype, device=coef.device).view(1, 3, 1, 1)
    m = YCBCR_TO_RGB.to(coef.device, coef.dtype)
    rgb = torch.einsum("kc,nchw->nkhw", m, ycc) / 255.0
    rgb = F.interpolate(rgb, size=(112, 112), mode="bilinear", align_corners=True)
    return rgb.clamp(0.0, 1.0) if clamp else rgb
