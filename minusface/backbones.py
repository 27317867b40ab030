"""Recognizer backbones f and f_p: TFace IR-18/IR-50 and MobileFaceNet
(docs/method.md, "Recognizers f and f_p").

All take 112x112 inputs with any channel count (192 for the DCT residue r, 3 for X_p) and return
un-normalised (N, 512) embeddings; the margin head (heads.py) normalises them.

As in the released MinusFace code, the TFace weight init is applied to the body first and the
input layer (stem) is built afterwards, so the stem keeps PyTorch's default init.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

EMBEDDING_SIZE = 512
INPUT_SIZE = 112


def tface_init(modules) -> None:
    """TFace `initialize_weights`: kaiming-normal (fan_out, relu) for Conv2d *and* Linear,
    BN2d weight 1 / bias 0, zero biases.  (TFace uses kaiming, not xavier, for the Linear.)"""
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn_prelu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + per-channel PReLU: the TFace/insightface `Conv_block`."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out), nn.PReLU(c_out),
    )


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, padding: int = 0,
            groups: int = 1) -> nn.Sequential:
    """Linear (activation-free) conv + BN: the `Linear_block`."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


# --------------------------------------------------------------------------------------------
# IR ("improved ResNet", TFace)
# --------------------------------------------------------------------------------------------

class BasicBlockIR(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_in == c_out:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # identity / subsample
        else:
            self.shortcut_layer = conv_bn(c_in, c_out, 1, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


IR_UNITS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 50: (3, 4, 14, 3)}


class IResNet(nn.Module):
    """TFace IR backbone; `width` is the first stage's width (64 in the paper), the stages use
    width x (1, 2, 4, 8); the embedding size does not depend on it."""

    def __init__(self, depth: int, in_channels: int, width: int = 64,
                 embedding_size: int = EMBEDDING_SIZE, dropout: float = 0.4) -> None:
        super().__init__()
        self.in_channels = in_channels           # 3 for f_p on X_p, 192 for f on r
        if depth not in IR_UNITS:
            raise ValueError(f"IR depth must be one of {sorted(IR_UNITS)}, got {depth}")
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = []
        c_prev = width
        for c, n in zip(widths, IR_UNITS[depth]):
            blocks.append(BasicBlockIR(c_prev, c, 2))
            blocks += [BasicBlockIR(c, c, 1) for _ in range(n - 1)]
            c_prev = c
        self.body = nn.Sequential(*blocks)
        spatial = INPUT_SIZE // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(widths[-1] * spatial * spatial, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )
        tface_init(self.modules())
        # Built after the init on purpose (docs/method.md, "Recognizers f and f_p"): the stem
        # keeps PyTorch's default init.
        self.input_layer = conv_bn_prelu(in_channels, width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


# --------------------------------------------------------------------------------------------
# MobileFaceNet (Chen et al. 2018; insightface/TFace layout)
# --------------------------------------------------------------------------------------------

class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise(stride) -> linear 1x1 project."""

    def __init__(self, c_in: int, c_out: int, expanded: int, stride: int,
                 residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.conv = conv_bn_prelu(c_in, expanded, 1)
        self.conv_dw = conv_bn_prelu(expanded, expanded, 3, stride, groups=expanded)
        self.project = conv_bn(expanded, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


def residual_stack(channels: int, expanded: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWise(channels, channels, expanded, 1, residual=True)
                           for _ in range(n)])


class MobileFaceNet(nn.Module):
    """Paper table 1: conv3x3 s2 64, dw3x3 64, bottlenecks (t, c, n, s) = (2, 64, 5, 2),
    (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1), conv1x1 512, linear GDC 7x7,
    linear 1x1 -> 512, BN.  (t = 4 on the two stride-2 transitions, as in the paper and the
    insightface/TFace code: groups 256 and 512.)  Stem keeps default init, like the IR nets."""

    def __init__(self, in_channels: int, embedding_size: int = EMBEDDING_SIZE) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv2_dw = conv_bn_prelu(64, 64, 3, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, 128, 2)
        self.conv_3 = residual_stack(64, 128, 4)
        self.conv_34 = DepthWise(64, 128, 256, 2)
        self.conv_4 = residual_stack(128, 256, 6)
        self.conv_45 = DepthWise(128, 128, 512, 2)
        self.conv_5 = residual_stack(128, 256, 2)
        self.conv_6_sep = conv_bn_prelu(128, 512, 1)
        self.output_layer = nn.Sequential(  # GDC
            conv_bn(512, 512, 7, groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        tface_init(self.modules())
        self.conv1 = conv_bn_prelu(in_channels, 64, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2_dw(self.conv1(x))
        x = self.conv_3(self.conv_23(x))
        x = self.conv_4(self.conv_34(x))
        x = self.conv_5(self.conv_45(x))
        return self.output_layer(self.conv_6_sep(x))


# --------------------------------------------------------------------------------------------
# Factory and optimiser helper
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[int, int | None, int], nn.Module]] = {
    "ir18": lambda c, w, e: IResNet(18, c, 64 if w is None else w, e),
    "ir50": lambda c, w, e: IResNet(50, c, 64 if w is None else w, e),
    "mobilefacenet": lambda c, w, e: _mobilefacenet(c, w, e),
}
BACKBONES = tuple(_BUILDERS)      # the names build_backbone accepts


def _mobilefacenet(in_channels: int, width: int | None, embedding_size: int) -> nn.Module:
    if width not in (None, 64):
        raise ValueError("mobilefacenet has a fixed width; pass width=None")
    return MobileFaceNet(in_channels, embedding_size)


def build_backbone(name: str, in_channels: int, width: int | None = None,
                   embedding_size: int = EMBEDDING_SIZE) -> nn.Module:
    """Backbone by name ("ir18", "ir50", "mobilefacenet"); `width` (IR only) is the base width."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(_BUILDERS)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    return _BUILDERS[key](in_channels, width, embedding_size)


def split_decay_params(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): every BatchNorm parameter and every bias goes to no_decay.

    Matches by module type, not by a name like "bn" (the released code's name match found no
    parameters; docs/method.md, "Departures from the released code").  PReLU slopes stay in
    `decay`, as in TFace.
    """
    no_decay_ids: set[int] = set()
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():  # deduplicates shared parameters
        (no_decay if id(p) in no_decay_ids or name.endswith("bias") else decay).append(p)
    return decay, no_decay
