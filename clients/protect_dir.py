"""Protect every face image under a folder and write X_p as PNG at the same relative path.

The run is planned before anything is written, so a refusal leaves the disk as it was:

* output name = the input's path relative to IN_DIR with its suffix replaced by ``.png``
  (``bob/face.jpg`` -> ``OUT_DIR/bob/face.png``).  Inputs that would share an output name
  (``face.jpg`` and ``face.png``; names are compared case-insensitively, as macOS and Windows
  do) refuse the whole run, listing them: no input may silently replace another's X_p.
* OUT_DIR and IN_DIR must not overlap after resolving symlinks (same folder, or one inside the
  other), otherwise originals could be replaced by X_p or earlier outputs protected again.
* existing files at output paths are refused unless ``overwrite``; a symbolic link at an output
  path or a symlinked folder inside OUT_DIR is always refused (X_p never lands outside OUT_DIR).
* each PNG is written to a hidden temp file in its folder and moved into place (hard link
  without ``overwrite``, so a file that appears meanwhile is not replaced; ``os.replace`` with
  it), so an interrupted run leaves whole PNGs only.

Inputs: regular files with a suffix in ``clients.data.IMAGE_EXTENSIONS`` (symlinks to files
are followed).  Everything else met on the walk is listed in ``ignored`` with a reason: other
suffixes, hidden files and folders, symlinked folders (not followed, so a link loop cannot
hang the walk), broken links and link loops, special files, unreadable folders.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from minusface.atomic import write_atomic
from minusface.frontend import MinusFaceFrontend

log = logging.getLogger(__name__)

LISTED = 5  # how many names an error or summary spells out before "and N more"


class ProtectError(ValueError):
    """A run refused up front (paths, names, existing files) or stopped by a write or X_p check."""


@dataclass
class ProtectPlan:
    """What a run will read and write; built without touching the disk."""
    in_dir: Path                                   # resolved
    out_dir: Path                                  # resolved
    jobs: list[tuple[Path, Path]]                  # (source image, destination PNG)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    overwrite: bool = False


@dataclass
class ProtectReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def listing(items: list[str], limit: int = LISTED) -> str:
    """'a, b, c and 4 more' for error messages that must stay one readable line."""
    head = ", ".join(items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------- finding inputs

def _classify_link(path: Path) -> str | None:
    """None for a link to a regular file (used), else why the link is ignored."""
    try:
        st = path.stat()
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else "broken symlink"
    if stat.S_ISDIR(st.st_mode):
        return "symlinked folder (not followed)"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _classify_file(entry: os.DirEntry, extensions: tuple[str, ...]) -> str | None:
    """None for a usable image candidate, else the reason it is ignored."""
    if entry.name.startswith("."):
        return "hidden file"
    if entry.is_symlink():
        reason = _classify_link(Path(entry.path))
        if reason:
            return reason
    elif not entry.is_file(follow_symlinks=False):
        return "not a regular file"
    if not entry.name.lower().endswith(extensions):
        return f"not an image file name (expected {', '.join(extensions)})"
    return None


def scan_folder(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image candidates, ignored (path, reason)) under `root`, both sorted; never follows a
    symlinked folder, so link loops neither hang nor crash the walk."""
    from clients.data import IMAGE_EXTENSIONS  # known layering debt: the list lives with decoding

    images: list[Path] = []
    ignored: list[tuple[Path, str]] = []
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            ignored.append((folder, f"folder cannot be read ({e.strerror})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if entry.name.startswith("."):
                    ignored.append((path, "hidden folder"))
                else:
                    stack.append(path)
                continue
            reason = _classify_file(entry, IMAGE_EXTENSIONS)
            if reason:
                ignored.append((path, reason))
            else:
                images.append(path)
    return sorted(images), sorted(ignored)


# --------------------------------------------------------------------------- planning

def _resolve_dirs(in_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    if not in_dir.exists():
        raise FileNotFoundError(f"{in_dir}: input folder not found")
    if not in_dir.is_dir():
        raise ProtectError(f"IN_DIR {in_dir}: is not a folder (expected a folder of face images)")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        where = ("is IN_DIR" if src == dst else "is inside IN_DIR" if src in dst.parents
                 else "contains IN_DIR")
        raise ProtectError(
            f"OUT_DIR {out_dir} {where} (IN_DIR {src}, OUT_DIR {dst} after resolving links): "
            f"the X_p would replace or mix with the faces being protected; choose an OUT_DIR "
            f"outside IN_DIR")
    return src, dst


def _check_out_dir(out_dir: Path, shown: Path) -> None:
    """OUT_DIR (or its nearest existing ancestor) must be a writable folder."""
    probe = out_dir
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        why = "is not a folder" if probe == out_dir else f"cannot be created: {probe} is not a folder"
        raise ProtectError(f"OUT_DIR {shown}: {why} (expected a folder, or a path where one "
                           f"can be created)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ProtectError(f"OUT_DIR {shown}: {probe} is not writable (permission denied)")


def _check_parents(out_dir: Path, rel_parent: Path, seen: dict[Path, None]) -> None:
    """Every existing folder between OUT_DIR and a PNG must be a real folder, not a link."""
    cur = out_dir
    for part in rel_parent.parts:
        cur = cur / part
        if cur in seen:
            continue
        if cur.is_symlink():
            raise ProtectError(f"{cur} is a symbolic link inside OUT_DIR; minusfed does not "
                               f"write through links (remove it or choose another OUT_DIR)")
        if not cur.exists():
            return
        if not cur.is_dir():
            raise ProtectError(f"{cur} is a file where an output folder is needed")
        seen[cur] = None


def _output_names(in_dir: Path, images: list[Path]) -> list[Path]:
    """Relative PNG names; refuse inputs that would share one (case-insensitively)."""
    rels = [p.relative_to(in_dir).with_suffix(".png") for p in images]
    groups: dict[str, list[Path]] = {}
    for src, rel in zip(images, rels):
        groups.setdefault(rel.as_posix().casefold(), []).append(src.relative_to(in_dir))
    clashes = [" + ".join(p.as_posix() for p in g) for g in groups.values() if len(g) > 1]
    if clashes:
        raise ProtectError(
            f"{len(clashes)} group(s) of inputs would be written to the same PNG (output = "
            f"input path with suffix .png, case-insensitive): {listing(clashes)}; rename or "
            f"move them so each name is unique")
    return rels


def _check_targets(out_dir: Path, rels: list[Path], overwrite: bool) -> None:
    existing: list[str] = []
    parents: dict[Path, None] = {}
    for rel in rels:
        _check_parents(out_dir, rel.parent, parents)
        dst = out_dir / rel
        if dst.is_symlink():
            raise ProtectError(f"{dst} is a symbolic link; minusfed never writes through or "
                               f"replaces links (remove it or choose another OUT_DIR)")
        if dst.is_dir():
            raise ProtectError(f"{dst} is a folder where an output PNG is needed")
        if dst.exists():
            existing.append(rel.as_posix())
    if existing and not overwrite:
        raise ProtectError(f"OUT_DIR {out_dir} already holds {len(existing)} of the output "
                           f"file(s): {listing(existing)}; pass --overwrite to replace them or "
                           f"choose an empty OUT_DIR")


def describe_ignored(ignored: list[tuple[Path, str]], root: Path, limit: int = 2 * LISTED) -> str:
    """One line: count and the first `limit` names with reasons."""
    names = []
    for path, reason in ignored:
        try:
            name = path.relative_to(root).as_posix()
        except ValueError:
            name = str(path)
        names.append(f"{name} ({reason})")
    return (f"ignored {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'}: "
            f"{listing(names, limit)}")


def plan_protection(in_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    overwrite: bool = False) -> ProtectPlan:
    """Check everything that can be checked before a model runs; raise `ProtectError`
    (FileNotFoundError for a missing IN_DIR) instead of writing anything."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    src, dst = _resolve_dirs(in_dir, out_dir)
    _check_out_dir(dst, out_dir)
    images, ignored = scan_folder(src)
    if not images:
        from clients.data import IMAGE_EXTENSIONS
        extra = f"; {describe_ignored(ignored, src)}" if ignored else " (the folder is empty)"
        raise ProtectError(f"IN_DIR {in_dir}: no face images found (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)} at any depth){extra}")
    rels = _output_names(src, images)
    _check_targets(dst, rels, overwrite)
    return ProtectPlan(src, dst, [(p, dst / r) for p, r in zip(images, rels)], ignored, overwrite)


# --------------------------------------------------------------------------- writing

def to_png_array(protected: torch.Tensor) -> np.ndarray:
    """(3, 112, 112) in [0, 1] -> uint8 HWC, rounded."""
    return (protected.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def write_png(arr: np.ndarray, dst: Path, overwrite: bool = False) -> None:
    """Write a PNG atomically (`minusface.atomic.write_atomic`); without overwrite a file that
    appeared at `dst` meanwhile is kept, and a symbolic link there is never replaced."""
    if dst.is_symlink():
        raise ProtectError(f"{dst} became a symbolic link during the run; not replaced")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    try:
        write_atomic(dst, lambda f: f.write(buf.getvalue()), sync=False, replace=overwrite)
    except FileExistsError:
        raise ProtectError(f"{dst} appeared during the run; not replaced") from None


def _make_parent(dst: Path) -> None:
    """mkdir, then make sure no link redirected the folder outside OUT_DIR meanwhile."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(os.path.realpath(dst.parent)) != dst.parent:  # OUT_DIR is resolved in the plan
        raise ProtectError(f"{dst.parent} resolves outside OUT_DIR (a symbolic link?); "
                           f"not writing there")


def check_outputs(faces: torch.Tensor, xp: torch.Tensor, names: list[Path]) -> list[np.ndarray]:
    """uint8 X_p, or ProtectError when the generator made NaN/Inf or a flat image of a face."""
    for img, name in zip(xp, names):
        if not bool(torch.isfinite(img).all()):
            raise ProtectError(f"X_p of {name} contains NaN or infinite values: the generator "
                               f"weights are corrupt; nothing was written for this batch")
    arrays = [to_png_array(img) for img in xp]
    for face, arr, name in zip(faces, arrays, names):
        if arr.min() == arr.max() and float(face.max() - face.min()) > 0:
            raise ProtectError(f"X_p of {name} is a constant image (every value {arr.min()}): "
                               f"the generator does not protect this face; check the weights")
    return arrays


def run_plan(plan: ProtectPlan, frontend: MinusFaceFrontend, batch_size: int = 32,
             resize: bool = False, progress: bool = True) -> ProtectReport:
    """Protect and write every planned image; unreadable images are skipped with a reason
    (reported once, by the caller), write failures raise `ProtectError` naming the file."""
    from clients.data import ImageError, load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = ProtectReport(ignored=list(plan.ignored))
    device = next(frontend.parameters()).device
    bar = tqdm(total=len(plan.jobs), desc="protect", unit="img", disable=not progress)
    try:
        for start in range(0, len(plan.jobs), batch_size):
            chunk = plan.jobs[start:start + batch_size]
            batch, jobs = [], []
            for src, dst in chunk:
                try:
                    batch.append(load_image(src, resize=resize))
                    jobs.append((src, dst))
                except (ImageError, FileNotFoundError) as e:
                    report.skipped.append((src, str(e)))
                    log.debug("skipped %s", e)
            if batch:
                faces = torch.stack(batch)
                xp = frontend.protect(faces.to(device), expected_faces=len(plan.jobs))
                arrays = check_outputs(faces, xp.cpu(), [s for s, _ in jobs])
                for (_src, dst), arr in zip(jobs, arrays):
                    _write_one(plan, arr, dst, report)
            bar.update(len(chunk))
    finally:
        bar.close()
    return report


def _write_one(plan: ProtectPlan, arr: np.ndarray, dst: Path, report: ProtectReport) -> None:
    try:
        _make_parent(dst)
        write_png(arr, dst, overwrite=plan.overwrite)
    except OSError as e:
        raise ProtectError(f"cannot write {dst} ({e.strerror or e}); {len(report.written)} "
                           f"image(s) were written before this") from e
    report.written.append(dst)


def protect_directory(in_dir: Path, out_dir: Path, frontend: MinusFaceFrontend,
                      batch_size: int = 32, resize: bool = False, progress: bool = True,
                      overwrite: bool = False) -> ProtectReport:
    """`plan_protection` then `run_plan`: non-image, corrupt or wrongly sized files are skipped
    with a reason (never a torch crash); unsafe output paths refuse the run before any write."""
    return run_plan(plan_protection(in_dir, out_dir, overwrite), frontend,
                    batch_size=batch_size, resize=resize, progress=progress)
