"""Saving and loading the generator g (the part every client needs to protect faces).

Files are plain `torch.save` dictionaries read back with `weights_only=True`.  A generator file
holds {"generator": state_dict, "width": int}; a training checkpoint that contains a "generator"
entry works too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .generator import UNetGenerator


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or holds no usable generator."""


def save_generator(generator: UNetGenerator, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
                "width": generator.width}, tmp)
    os.replace(tmp, path)


def generator_width(state: dict[str, torch.Tensor]) -> int:
    """Infer w from the first convolution (enc1: 192 -> w)."""
    key = "enc1.0.weight"
    if key not in state:
        raise WeightsError(f"no '{key}' in the generator state dict: not a MinusFace generator")
    return int(state[key].shape[0])


def load_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> UNetGenerator:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    state = obj.get("generator") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict with a 'generator' state dict "
                           f"(as written by minusfed), found keys {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}")
    g = UNetGenerator(width=generator_width(state))
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{path}: generator weights do not fit the U-Net: {e}") from e
    return g.eval()
