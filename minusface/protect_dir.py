"""Protect every face image under a folder and write X_p as PNG at the same relative path."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .frontend import MinusFaceFrontend

log = logging.getLogger(__name__)


@dataclass
class ProtectReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_images(root: Path) -> list[Path]:
    from clients.data import IMAGE_EXTENSIONS
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def to_png_array(protected: torch.Tensor) -> np.ndarray:
    """(3, 112, 112) in [0, 1] -> uint8 HWC, rounded."""
    return (protected.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def protect_directory(in_dir: Path, out_dir: Path, frontend: MinusFaceFrontend,
                      batch_size: int = 32, resize: bool = False,
                      progress: bool = True) -> ProtectReport:
    """Non-image, corrupt or wrongly sized files are skipped with a reason (never a torch crash)."""
    from clients.data import ImageError, load_image

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: input folder not found")
    report = ProtectReport()
    # Listed once before writing, so PNGs written inside the input tree are never re-read.
    paths = find_images(in_dir)
    device = next(frontend.parameters()).device
    bar = tqdm(total=len(paths), desc="protect", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for p in paths[start:start + batch_size]:
            try:
                batch.append(load_image(p, resize=resize))
                names.append(p)
            except ImageError as e:
                report.skipped.append((p, str(e)))
                log.warning("skipped %s", e)
        if batch:
            xp = frontend.protect(torch.stack(batch).to(device))
            for p, img in zip(names, xp):
                dst = (out_dir / p.relative_to(in_dir)).with_suffix(".png")
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(to_png_array(img)).save(dst)
                report.written.append(dst)
        bar.update(len(paths[start:start + batch_size]))
    bar.close()
    return report
