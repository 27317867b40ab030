"""Generator g: the 192 -> 192 U-Net of MinusFace (docs/method.md, "Generator g").

Widths w, 2w, 4w, 8w, 16w (w = 64 is the paper's, about 34.6 M parameters); two 3x3 convs with
bias and ReLU per block, no normalisation layers, no output activation, transposed 3x3 stride-2
up-sampling and a 1x1 head.  Default PyTorch initialisation, as in the released code.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Transposed conv (C -> C/2, x2), concatenate the skip, ConvBlock (C -> C/2)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, 3, stride=2, padding=1, output_padding=1)
        self.block = ConvBlock(c_in, c_in // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.up(x)], dim=1))


class UNetGenerator(nn.Module):
    """x' = g(x) for DCT tensors x of shape (N, 192, 112, 112); `forward_with_latent` also
    returns the 16w x 7 x 7 bottleneck (used only by the optional sparsity loss, weight 0)."""

    def __init__(self, channels: int = 192, width: int = 64) -> None:
        super().__init__()
        w = width
        self.channels, self.width = channels, width
        self.enc1 = ConvBlock(channels, w)
        self.enc2 = ConvBlock(w, 2 * w)
        self.enc3 = ConvBlock(2 * w, 4 * w)
        self.enc4 = ConvBlock(4 * w, 8 * w)
        self.bottleneck = ConvBlock(8 * w, 16 * w)
        self.pool = nn.MaxPool2d(2)
        self.dec4, self.dec3 = Up(16 * w), Up(8 * w)
        self.dec2, self.dec1 = Up(4 * w), Up(2 * w)
        self.head = nn.Conv2d(w, channels, 1)

    def forward_with_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        z = self.bottleneck(self.pool(e4))
        y = self.dec4(z, e4)
        y = self.dec3(y, e3)
        y = self.dec2(y, e2)
        y = self.dec1(y, e1)
        return self.head(y), z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latent(x)[0]
