"""A site's own faces: which identities it holds, its training array and its held-out pairs.

Simulation: the identities of the LFW View 2 training split (every identity not in the
server's evaluation fold) are partitioned across `num-partitions` virtual sites by
`simulation.partition`; site `partition-id` takes its share.  Deployment: a node's
`data-path` in its node config is a folder-per-identity tree that belongs to that site alone.

Held-out pairs for federated evaluation: the last image (by name) of every identity with at
least 3 images is never trained on; it forms one same pair (with the identity's first image)
and one different pair (with the next identity's first image).

The decoded training faces (raw faces) are cached as an .npz in the folder the site chose
(`clients.site_state.cache_dir`: owner-only, never the server's out-dir); without one, or when
it fails, they are decoded again for every message.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from clients.data import IMAGE_EXTENSIONS, FaceDataset, load_faces, scan_identity_folders, view2_fold_split
from clients.site_state import warn_once
from minusface.presets import Preset


def federation_identities(lfw_root: Path, eval_fold: int, preset: Preset,
                          max_identities: int = 0) -> dict[str, list[str]]:
    """Training identities of the whole federation: disjoint from the server's eval fold.

    Remembered per process (a Ray actor runs many sites and rounds; scanning LFW's 5,749
    folders took 0.3 s per message), keyed by the arguments and the modification times of the
    data folder, its image folder and pairs.txt.  Each call gets its own copy."""
    root = Path(lfw_root).resolve()
    stamps = tuple(_mtime_ns(root / part) for part in ("", "images", "pairs.txt"))
    cached = _federation_identities(root, int(eval_fold), preset.min_images_per_identity,
                                    preset.max_images_per_identity, int(max_identities), stamps)
    return {name: list(paths) for name, paths in cached.items()}


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@functools.lru_cache(maxsize=8)
def _federation_identities(root: Path, eval_fold: int, min_images: int, max_images: int | None,
                           max_identities: int, stamps: tuple[int, ...]
                           ) -> dict[str, tuple[str, ...]]:
    del stamps                                          # part of the cache key only
    ids, _ = view2_fold_split(root, eval_fold, min_images)
    if max_images:
        ids = {n: sorted(p)[:max_images] for n, p in ids.items()}
    if max_identities:
        # the identities with most images first, then by name: deterministic and trainable
        keep = sorted(ids, key=lambda n: (-len(ids[n]), n))[:max_identities]
        ids = {n: ids[n] for n in sorted(keep)}
    return {n: tuple(p) for n, p in ids.items()}


@dataclass
class SiteData:
    train: FaceDataset                 # images never in `eval_*`
    eval_faces: np.ndarray             # uint8 (M, 112, 112, 3) held-out + anchor images
    eval_a: np.ndarray                 # pair index arrays into eval_faces
    eval_b: np.ndarray
    eval_same: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def split_held_out(
    identities: dict[str, list[str]],
) -> tuple[dict[str, list[str]], list[tuple[str, str, bool]]]:
    names = sorted(identities)
    train = {n: sorted(identities[n]) for n in names}
    held = [n for n in names if len(train[n]) >= 3]
    pairs: list[tuple[str, str, bool]] = []
    for k, n in enumerate(held):
        probe = train[n].pop()                          # never trained on
        pairs.append((probe, train[n][0], True))
        other = held[(k + 1) % len(held)]
        if other != n:
            pairs.append((probe, sorted(identities[other])[0], False))
    return train, pairs


def _cache_file(cache_dir: Path, tag: str, paths: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return cache_dir / f"{tag}-{digest}.npz"


def _owner_only(cache: Path) -> None:
    """A cache file of ours that others can read (copied in, or from an older minusfed) -> 0600."""
    try:
        st = cache.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(cache, 0o600)
            log(WARNING, "face cache %s was readable by other users; made it 0600", cache)
    except OSError:
        pass                                            # missing or not ours: load_faces decides


def _train_faces(train_ids: dict[str, list[str]], cache: Path | None) -> FaceDataset:
    """The training faces, through the cache when it works; a cache that cannot be read or
    written (full disk, lost permission) costs a re-decode and a warning, never the round."""
    if cache is None:
        return load_faces(train_ids, train=True, progress=False)
    _owner_only(cache)
    try:
        return load_faces(train_ids, cache=cache, train=True, progress=False)
    except OSError as e:
        warn_once(f"cache-io:{cache}", "face cache %s failed (%s); training without a cache: set "
                  "node config 'cache-dir' to a writable folder (or \"off\")", cache, e)
        return load_faces(train_ids, train=True, progress=False)


def load_site(identities: dict[str, list[str]], cache_dir: Path | None, tag: str) -> SiteData:
    if not identities:
        raise ValueError(f"site {tag}: no identities with usable images")
    train_ids, pairs = split_held_out(identities)
    all_paths = sorted(p for ps in train_ids.values() for p in ps)
    cache = _cache_file(cache_dir, tag, all_paths) if cache_dir else None
    train = _train_faces(train_ids, cache)
    eval_paths = sorted({p for a, b, _ in pairs for p in (a, b)})
    where = {p: i for i, p in enumerate(eval_paths)}
    if eval_paths:
        ev = FaceDataset([(p, 0) for p in eval_paths], skip_errors=True, progress=False)
        ok = set(os.path.join(ev.root, p) for p in ev.paths)
        pairs = [t for t in pairs if t[0] in ok and t[1] in ok]
        eval_paths = sorted({p for a, b, _ in pairs for p in (a, b)})
        where = {p: i for i, p in enumerate(eval_paths)}
        lookup = {os.path.join(ev.root, p): i for i, p in enumerate(ev.paths)}
        faces = (ev.images[[lookup[p] for p in eval_paths]] if eval_paths
                 else np.zeros((0, 112, 112, 3), np.uint8))
    else:
        faces = np.zeros((0, 112, 112, 3), np.uint8)
    a = np.array([where[x] for x, _, _ in pairs], dtype=np.int64)
    b = np.array([where[y] for _, y, _ in pairs], dtype=np.int64)
    same = np.array([s for _, _, s in pairs], dtype=bool)
    return SiteData(train=train, eval_faces=faces, eval_a=a, eval_b=b, eval_same=same)


def _describe_folder(root: Path) -> str:
    """What a site folder holds, for error messages: 'empty', '3 files, 0 sub-folders'."""
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    except OSError as e:
        return f"unreadable ({e})"
    if not entries:
        return "empty"
    dirs = sum(1 for e in entries if e.is_dir())
    return f"{len(entries) - dirs} file(s) and {dirs} sub-folder(s) directly in it"


def site_identities_from_folder(root: Path, preset: Preset) -> dict[str, list[str]]:
    """Deployment: every identity folder under a site's own data-path.

    An unusable folder raises an error that names it, says what it holds and what a site folder
    must hold (the ClientApp's error reply carries it to the server log and metrics.jsonl)."""
    need = preset.min_images_per_identity
    expected = (f"expected one sub-folder per identity holding its face images "
                f"({root}/<identity>/<image>, suffix {'/'.join(IMAGE_EXTENSIONS)}), "
                f"at least {need} images per identity")
    try:
        found = scan_identity_folders(root, min_images_per_identity=need)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"site data-path {root}: not a folder; {expected}") from e
    except ValueError as e:
        raise ValueError(f"site data-path {root} holds no face images "
                         f"({_describe_folder(root)}); {expected}") from e
    if not found:
        raise ValueError(f"site data-path {root}: no identity folder with at least {need} "
                         f"images ({_describe_folder(root)}); {expected}")
    return {n: ps for n, ps in found}
