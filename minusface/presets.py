"""Training presets: one place that says which models, widths and budgets a run uses.

`tiny` is for tests and smoke runs (seconds), `cpu-small` for a 2-core CPU (about an hour for the
three centralized recipes on one LFW View 2 fold), `gpu-small` for a few minutes of one GPU,
`paper` for GPUs (IR-50, w = 64, 24 epochs,
batch 64, SGD 0.01 / 1e-4, LR / 10 at epochs 10, 18, 22).

A federated run picks a preset by name and may override some of its fields with run-config keys
of the same name (batch-size, lr, widths, backbone, ...; task/config.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# LR / 10 at epochs 10, 18 and 22 of 24 (paper), as fractions of all steps so any budget keeps
# the same shape.
PAPER_MILESTONES = (10 / 24, 18 / 24, 22 / 24)


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str                 # "ir18" | "ir50" | "mobilefacenet"
    backbone_width: int | None    # IR base width (64 = paper); None for MobileFaceNet
    generator_width: int          # U-Net w (64 = paper)
    head: str = "arcface"
    head_s: float = 64.0          # margin-head scale (paper: 64)
    head_m: float = 0.5           # margin (paper: ArcFace 0.5)
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    generator_lr_ratio: float = 0.5
    epochs: int = 24              # per recipe: baseline, stage 1 and stage 2 each
    repeat: int = 3               # each image this many times per epoch (paper's stage-2 3x)
    milestones: tuple[float, ...] = PAPER_MILESTONES
    min_images_per_identity: int = 2
    max_images_per_identity: int | None = None   # cap (first N by name) to bound CPU budgets

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> Preset:
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", backbone="ir18", backbone_width=8, generator_width=4, batch_size=16,
                   lr=0.01, epochs=1, repeat=1, max_images_per_identity=6),
    # Measured on 2 cores (batch 32, ms per image, fwd+bwd): IR-18 w16 26 (3 ch) / 54 (192 ch),
    # U-Net w8 100 (fwd 27), w16 149 (fwd 48).  w = 8 and at most 10 images per identity
    # (LFW View 2 fold 0: 5,740 images of 1,505 people) keep the three recipes near an hour.
    "cpu-small": Preset("cpu-small", backbone="ir18", backbone_width=16, generator_width=8,
                        batch_size=32, lr=0.1, weight_decay=5e-4, epochs=1, repeat=3,
                        max_images_per_identity=10),
    # One GPU, minutes per recipe: IR-18 at half width and a w = 16 generator, so the three
    # centralized recipes and the federated run together fit a short GPU lease (bench/gpu.sh).
    "gpu-small": Preset("gpu-small", backbone="ir18", backbone_width=32, generator_width=16,
                        batch_size=128, lr=0.1, weight_decay=5e-4, epochs=8, repeat=3),
    "paper": Preset("paper", backbone="ir50", backbone_width=64, generator_width=64,
                    batch_size=64, lr=0.01, weight_decay=1e-4, epochs=24, repeat=3),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
