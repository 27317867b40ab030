"""Saving and loading the generator g (the part every client needs to protect faces).

Files are plain `torch.save` dictionaries read back with `weights_only=True`.  A generator file
holds {"generator": state_dict, "width": int, "meta": dict}; a training checkpoint that contains a
"generator" entry works too.  "meta" (plain types, optional) says how the generator was made
(preset, rounds trained, commit), so a user of the file can tell a trained g from a smoke run's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import write_atomic
from .generator import UNetGenerator


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or holds no usable generator."""


_PLAIN = (str, int, float, bool, type(None))


def _describe(weight: object) -> str:
    return str(tuple(weight.shape)) if isinstance(weight, torch.Tensor) else type(weight).__name__


def _keys_of(obj: object) -> object:
    return list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__


def _check_plain(value: object, where: str) -> None:
    """Fail at save time, naming the entry, on anything `weights_only=True` would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"generator meta{where}: key {key!r} is not a str")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"generator meta{where}: {type(value).__name__} is not a plain type "
                        "(str, int, float, bool, None, list, dict)")


def save_generator(generator: UNetGenerator, path: str | os.PathLike,
                   meta: dict | None = None) -> None:
    """Write g atomically (tmp + fsync + rename: a crash leaves the old file or the new one),
    with `meta` (plain types) saying how it was made; read it back with `generator_metadata`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_plain(meta or {}, "")
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    payload = {"generator": state, "width": generator.width, "meta": dict(meta or {})}
    write_atomic(path, lambda file: torch.save(payload, file))


def generator_metadata(path: str | os.PathLike) -> dict:
    """The "meta" dict saved with a generator file ({} for a file written without one).

    Loaded with `weights_only=True` and memory-mapped, so reading it costs no copy of the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict (as written by minusfed), "
                           f"found {type(obj).__name__}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: 'meta' should be a dict, found {type(meta).__name__}")
    return meta


def generator_width(state: Mapping[str, torch.Tensor]) -> int:
    """Infer w from the first convolution (enc1: 192 -> w)."""
    key = "enc1.0.weight"
    if key not in state:
        raise WeightsError(f"no '{key}' in the generator state dict: not a MinusFace generator")
    weight = state[key]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] < 1:
        raise WeightsError(f"'{key}' should be a 4-d convolution weight (w, 192, 3, 3), found "
                           f"{_describe(weight)}")
    return int(weight.shape[0])


MAX_WIDTH = 256  # the paper's w is 64; a file claiming more would allocate gigabytes first


def _check_types(where: str, state: Mapping) -> None:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{where}: generator entry {key!r} is a {type(value).__name__}, "
                               f"expected a tensor (not a file written by minusfed?)")


def _check_finite(where: str, state: Mapping) -> None:
    """A NaN or Inf weight would protect every face to a black or constant image."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise WeightsError(f"{where}: generator entry {key!r} holds {bad} NaN/Inf "
                                   f"value(s) of {value.numel()}: the file is corrupt or "
                                   f"training diverged")


def _check_shapes(where: str, state: Mapping, width: int) -> None:
    """Compare shapes with a U-Net of width w built on the meta device (no memory), so a state
    claiming a huge width is refused before a real model is allocated."""
    if width > MAX_WIDTH:
        raise WeightsError(f"{where}: generator width {width} (from enc1.0.weight) is above "
                           f"{MAX_WIDTH}; expected a MinusFace U-Net (w = 64 in the paper)")
    with torch.device("meta"):
        expected = UNetGenerator(width=width).state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{where}: generator weights do not fit a U-Net of width {width}: "
                           f"{'; '.join(wrong[:4])}")


def build_generator(state: Mapping[str, torch.Tensor], where: str = "generator",
                    check_finite: bool = True) -> UNetGenerator:
    """g from its state dict (keys without a module prefix), at the width the weights imply;
    `WeightsError` naming `where` for anything but a whole MinusFace U-Net.  `check_finite`
    off: weights the server already screened, where a NaN shows up downstream as before."""
    _check_types(where, state)
    try:
        width = generator_width(state)
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None
    _check_shapes(where, state, width)
    if check_finite:
        _check_finite(where, state)
    g = UNetGenerator(width=width)
    try:
        g.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{where}: generator weights do not fit the U-Net: {e}") from e
    return g


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
                           f"(as written by minusfed), found keys {_keys_of(obj)}")
    return build_generator(state, where=str(path)).eval()
