"""Face data at one site: decoding, identity folders, an in-memory dataset with a cache, LFW pairs.

Faces are 112x112 aligned crops.  Images are decoded once into a uint8 array (N, 112, 112, 3)
and converted to float tensors in [-1, 1] ((v / 255 - 0.5) / 0.5) only when an item is read, so
a whole site fits in memory (LFW: 13,233 images = 0.5 GB) and epochs do no JPEG work.

Input conversions (documented, not silent surprises):
* grayscale (L, LA, 1), RGBA, palette (P, PA), CMYK and YCbCr images are converted with
  Pillow's ``convert("RGB")``; alpha is dropped, not composited.
* 16-bit images keep their look: 16-bit grey (Pillow modes I;16*, and I as Pillow gives for a
  16-bit PGM) is scaled to 8 bits by its high byte (v >> 8), which is what Pillow itself does
  for 16-bit RGB(A) PNGs; ``convert("RGB")`` would clip every value above 255 to white.  Mode I
  values outside 0..65535 (or all <= 255: 8-bit data in a 32-bit image, ambiguous) and 32-bit
  float images (F, no defined range) raise `ImageError`.
* a size other than 112x112 is an error (the model needs an aligned crop), unless
  ``resize=True``, which resizes with Pillow BICUBIC to 112x112 ignoring the aspect ratio.
* non-image files and truncated or corrupt files raise `ImageError`: the whole image is decoded
  with ``im.load()`` and Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False, so a cut-off
  JPEG fails instead of coming back with a grey bottom half.

LFW pair protocol: see `read_pairs`, `view2_fold_split` and `view1_split`.  Training sets built
here are identity-disjoint from the test pairs, which is what makes the reported accuracy honest.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from minusface.atomic import write_atomic
from minusface.images import to_signed  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

SIZE = 112
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif",
                                     ".tiff", ".webp")
CACHE_VERSION = 1
PathLike = str | os.PathLike


class ImageError(ValueError):
    """An image file that cannot be used as a face: not an image, corrupt, or the wrong size."""


# --------------------------------------------------------------------------- decoding

def _warn_if_truncated_allowed() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere): truncated "
                    "images will decode with missing pixels instead of raising ImageError")


def _grey16_to_rgb(im: Image.Image, path: str) -> Image.Image:
    """16-bit grey (I;16*, or I holding 0..65535) -> RGB by the high byte, like Pillow's 16-bit RGB."""
    arr = np.asarray(im)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535 or (im.mode == "I" and hi <= 255):
        # 32-bit I holding only 0..255 is as likely 8-bit data as a near-black 16-bit face.
        raise ImageError(f"{path}: {im.mode} image with values {lo}..{hi}, expected 16-bit "
                         f"values 0..65535 (save the face as 8- or 16-bit grey or RGB)")
    return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")


def _to_rgb(im: Image.Image, path: str) -> Image.Image:
    """8-bit RGB from any Pillow mode; see the module doc for the conversions."""
    if im.mode == "RGB":
        return im
    if im.mode == "I" or im.mode.startswith("I;16"):
        return _grey16_to_rgb(im, path)
    if im.mode == "F":
        raise ImageError(f"{path}: 32-bit float image (mode F) has no defined value range, "
                         f"expected 8- or 16-bit grey or RGB (save the face as PNG or JPEG)")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{path}: image mode {im.mode} cannot be converted to RGB ({e})") from e


def decode_image(path: PathLike, resize: bool = False) -> np.ndarray:
    """Decode one face to uint8 (112, 112, 3) RGB; raise `ImageError` naming the file if unusable.

    A missing file raises FileNotFoundError (it is a path problem, not an image problem).
    """
    path = os.fspath(path)
    _warn_if_truncated_allowed()
    try:
        with Image.open(path) as im:
            im.load()                                  # full decode: catches truncation here
            im = _to_rgb(im, path)
            if im.size != (SIZE, SIZE):
                if not resize:
                    raise ImageError(
                        f"{path}: image is {im.size[0]}x{im.size[1]} (width x height), expected a "
                        f"{SIZE}x{SIZE} aligned face crop; pass resize=True to resize it with "
                        f"bicubic interpolation (aspect ratio not kept)")
                im = im.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image file (Pillow cannot identify its "
                         f"format)") from e
    except (PermissionError, IsADirectoryError) as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror})") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    if arr.shape != (SIZE, SIZE, 3):                   # defensive: exotic modes
        raise ImageError(f"{path}: decoded to shape {arr.shape}, expected ({SIZE}, {SIZE}, 3)")
    return arr


def load_image(path: PathLike, resize: bool = False) -> torch.Tensor:
    """One face as a float32 tensor (3, 112, 112) in [-1, 1]; see the module doc for conversions."""
    return to_signed(decode_image(path, resize=resize))


# --------------------------------------------------------------------------- identity folders

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_identity_folders(root: PathLike, min_images_per_identity: int = 1,
                          skip_empty: bool = True) -> list[tuple[str, list[str]]]:
    """List ``root/<identity>/<image>`` as sorted (identity, sorted image paths) pairs.

    Only files with an `IMAGE_EXTENSIONS` suffix count; hidden entries and stray files directly
    under root are ignored.  Empty identity folders are skipped and counted in a log line, or
    raise ValueError when ``skip_empty=False`` (a half-copied site should not train silently).
    Identities with fewer than ``min_images_per_identity`` images are dropped (logged).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"face folder not found: {root} (expected root/<identity>/<image>)")
    out: list[tuple[str, list[str]]] = []
    empty: list[str] = []
    too_few = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = sorted(f.name for f in os.scandir(entry.path) if _is_image(f.name) and f.is_file())
        if not files:
            empty.append(entry.name)
            continue
        if len(files) < min_images_per_identity:
            too_few += 1
            continue
        out.append((entry.name, [os.path.join(entry.path, f) for f in files]))
    if empty:
        if not skip_empty:
            raise ValueError(f"{root}: {len(empty)} identity folder(s) hold no image "
                             f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})")
        log.info("%s: skipped %d empty identity folder(s)", root, len(empty))
    if too_few:
        log.info("%s: dropped %d identities with fewer than %d images", root, too_few,
                 min_images_per_identity)
    if not out and not too_few:
        raise ValueError(f"{root}: no images found in identity folders "
                         f"(expected root/<identity>/<image> with suffix in {IMAGE_EXTENSIONS})")
    return out


# --------------------------------------------------------------------------- dataset

Samples = Mapping[str, Sequence[PathLike]] | Sequence[tuple[PathLike, int | str]]


def _normalise_samples(samples: Samples) -> tuple[list[str], list[str]]:
    """-> (absolute paths, identity name per path).  Mapping order is sorted by name."""
    paths: list[str] = []
    names: list[str] = []
    if isinstance(samples, Mapping):
        for name in sorted(samples):
            for p in samples[name]:
                paths.append(os.path.abspath(os.fspath(p)))
                names.append(str(name))
    else:
        for p, label in samples:
            paths.append(os.path.abspath(os.fspath(p)))
            names.append(str(label))
    return paths, names


def _identity_order(names: Sequence[str], raw: Samples) -> list[str]:
    """Names in label order: sorted names, or for (path, label) input the sorted raw labels
    (so int labels 2, 10 keep numeric order)."""
    if isinstance(raw, Mapping):
        return sorted(set(names))
    return [str(lab) for lab in sorted({lab for _, lab in raw})]


def _common_root(paths: Sequence[str]) -> str:
    dirs = {os.path.dirname(p) for p in paths}
    return os.path.commonpath(list(dirs)) if dirs else os.getcwd()


class FaceDataset(Dataset):
    """Decoded faces of one site with labels 0..K-1; items are (tensor in [-1, 1], label).

    Built from an identity -> paths mapping or a list of (path, label).  Files that cannot be
    decoded are skipped: each is logged with its path and reason (``logging.warning``), a summary
    count is printed to stderr, and (path, reason) pairs stay in `skipped`.  Identities left with
    no image are dropped before labels are remapped.  Set ``skip_errors=False`` to raise instead
    (evaluation pairs must not lose images).

    ``train=True`` flips each read horizontally with p = 0.5 (torch RNG, so DataLoader workers
    draw independently).  ``repeat`` makes one epoch visit every image ``repeat`` times
    (index i reads image i % n), as stage 2 does with 3.
    """

    def __init__(self, samples: Samples, *, train: bool = False, repeat: int = 1,
                 resize: bool = False, root: PathLike | None = None, skip_errors: bool = True,
                 progress: bool | None = None, num_workers: int | None = None) -> None:
        if not isinstance(samples, Mapping):
            samples = list(samples)                    # iterated twice below
        paths, names = _normalise_samples(samples)
        if not paths:
            raise ValueError("FaceDataset: no samples given")
        order = _identity_order(names, samples)
        base = os.path.abspath(os.fspath(root)) if root is not None else _common_root(paths)
        rel = [os.path.relpath(p, base) for p in paths]
        arrays, errors = _decode_all(paths, resize, progress, num_workers)
        skipped = [(p, err) for p, err in zip(paths, errors) if err is not None]
        if skipped:
            for p, err in skipped:
                log.warning("skipping unreadable face %s: %s", p, err)
            print(f"FaceDataset: skipped {len(skipped)} of {len(paths)} image(s) that could not "
                  f"be decoded (first: {skipped[0][0]})", file=sys.stderr)
            if not skip_errors:
                raise ImageError(f"{len(skipped)} image(s) could not be decoded; first: "
                                 f"{skipped[0][1]}")
        keep = [i for i, err in enumerate(errors) if err is None]
        if not keep:
            raise ValueError(f"FaceDataset: none of the {len(paths)} images under {base} could be "
                             f"decoded (expected {SIZE}x{SIZE} face crops, JPEG/PNG/...); "
                             f"first: {skipped[0][1]}")
        kept_names = [names[i] for i in keep]
        present = set(kept_names)
        identities = [n for n in order if n in present]
        index = {n: k for k, n in enumerate(identities)}
        images = np.stack([arrays[i] for i in keep])
        labels = np.array([index[n] for n in kept_names], dtype=np.int64)
        self._set(images, labels, identities, [rel[i] for i in keep], base, train, repeat)
        self.skipped: list[tuple[str, str]] = skipped
        self.resize = resize
        self.source_paths: list[str] = rel
        self.source_identities: list[str] = list(names)

    def _set(self, images: np.ndarray, labels: np.ndarray, identities: list[str],
             paths: list[str], root: str, train: bool, repeat: int) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.images = images            # uint8 (N, 112, 112, 3), possibly a read-only memmap
        self.labels = labels            # int64 (N,), values 0..K-1
        self.identities = identities    # names, index = label
        self.paths = paths              # relative to `root`, one per image
        self.root = root
        self.train = train
        self.repeat = repeat

    # ---- Dataset protocol
    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.labels)
        if i < 0:
            i += len(self)
        if not 0 <= i < n * self.repeat:
            raise IndexError(i)
        j = i % n
        x = to_signed(self.images[j])                  # a fresh tensor, also from a memmap
        if self.train and torch.rand(()) < 0.5:
            x = torch.flip(x, dims=(2,))
        return x, int(self.labels[j])

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        """Unflipped float batches (B, 3, 112, 112) over each image once, in order (for `embed`)."""
        for s in range(0, self.num_images, batch_size):
            yield to_signed(self.images[s:s + batch_size])

    # ---- cache
    def save_cache(self, path: PathLike) -> None:
        """Write images, labels, names and relative paths to an uncompressed .npz (atomic rename).

        Uncompressed so `from_cache` can memory-map the image array instead of reading 0.5 GB.
        These are raw faces: a missing folder is made 0700 and the file is written 0600 from
        its first byte, so no other user can read it even while it is being written.
        """
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        meta = {"version": CACHE_VERSION, "root": self.root, "resize": bool(self.resize)}
        write_atomic(path, lambda f: np.savez(
            f, images=np.ascontiguousarray(self.images), labels=self.labels,
            identities=np.array(self.identities, dtype=str), paths=np.array(self.paths, dtype=str),
            source_paths=np.array(self.source_paths, dtype=str),
            source_identities=np.array(self.source_identities, dtype=str),
            meta=np.array(json.dumps(meta))), mode=0o600, sync=False)

    @classmethod
    def from_cache(cls, path: PathLike, *, train: bool = False, repeat: int = 1) -> FaceDataset:
        """Load a dataset written by `save_cache`; images are memory-mapped when possible."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"face cache not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != CACHE_VERSION:
                raise ValueError(f"{path}: cache version {meta.get('version')}, "
                                 f"expected {CACHE_VERSION}")
            labels = z["labels"].astype(np.int64)
            identities = [str(s) for s in z["identities"]]
            paths = [str(s) for s in z["paths"]]
            source_paths = [str(s) for s in z["source_paths"]]
            source_identities = [str(s) for s in z["source_identities"]]
            images = _mmap_npz_member(path, "images")
            if images is None:
                images = z["images"]
        if images.shape != (len(labels), SIZE, SIZE, 3) or images.dtype != np.uint8:
            raise ValueError(f"{path}: cached images have shape {images.shape} {images.dtype}, "
                             f"expected ({len(labels)}, {SIZE}, {SIZE}, 3) uint8")
        ds = cls.__new__(cls)
        ds._set(images, labels, identities, paths, meta["root"], train, repeat)
        ds.skipped = []
        ds.resize = bool(meta["resize"])
        ds.source_paths = source_paths
        ds.source_identities = source_identities
        return ds


def _decode_or_error(path: str, resize: bool) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path, resize=resize), None
    except (ImageError, OSError) as e:
        return None, str(e)


def _decode_all(paths: Sequence[str], resize: bool, progress: bool | None,
                num_workers: int | None) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode in a thread pool (Pillow releases the GIL while decoding) with a progress bar."""
    workers = num_workers or min(8, os.cpu_count() or 1)
    bar = dict(total=len(paths), desc="decoding faces", unit="img", leave=False,
               disable=None if progress is None else not progress)
    fn = lambda p: _decode_or_error(p, resize)  # noqa: E731
    if workers <= 1:
        results = list(tqdm(map(fn, paths), **bar))
    else:
        with ThreadPoolExecutor(workers) as ex:
            results = list(tqdm(ex.map(fn, paths, chunksize=64), **bar))
    return [r[0] for r in results], [r[1] for r in results]


def _mmap_npz_member(path: str, name: str) -> np.ndarray | None:
    """Memory-map an uncompressed array inside an .npz (np.load ignores mmap_mode for .npz)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + n_name + n_extra)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
        if dtype.hasobject:
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                         order="F" if fortran else "C")
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


def _cache_matches(cache: str, paths: Sequence[str], names: Sequence[str], resize: bool) -> bool:
    try:
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return (meta.get("version") == CACHE_VERSION and bool(meta.get("resize")) == resize
                    and [str(s) for s in z["source_paths"]] == list(paths)
                    and [str(s) for s in z["source_identities"]] == list(names))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        log.warning("face cache %s unreadable (%s); rebuilding", cache, e)
        return False


def load_faces(root_or_paths: PathLike | Samples, *, cache: PathLike | None = None,
               train: bool = False, repeat: int = 1, resize: bool = False,
               min_images_per_identity: int = 1, skip_empty: bool = True,
               progress: bool | None = None, num_workers: int | None = None) -> FaceDataset:
    """A `FaceDataset` from a folder (root/<identity>/<image>), a mapping or (path, label) pairs.

    With ``cache`` set, reuse the .npz when it was built from the same file list (same relative
    paths and identities, same resize flag); otherwise decode and (re)write it.
    """
    if isinstance(root_or_paths, (str, os.PathLike)):
        root = os.path.abspath(os.fspath(root_or_paths))
        samples: Samples = dict(scan_identity_folders(root, min_images_per_identity, skip_empty))
    else:
        root, samples = None, root_or_paths
        if isinstance(samples, Mapping) and min_images_per_identity > 1:
            samples = {k: v for k, v in samples.items() if len(v) >= min_images_per_identity}
    if cache is not None:
        cache = os.fspath(cache)
        paths, names = _normalise_samples(samples)
        base = root if root is not None else _common_root(paths)
        rel = [os.path.relpath(p, base) for p in paths]
        if os.path.isfile(cache) and _cache_matches(cache, rel, names, resize):
            log.info("using face cache %s", cache)
            return FaceDataset.from_cache(cache, train=train, repeat=repeat)
        if os.path.isfile(cache):
            log.info("face cache %s was built from other files; rebuilding", cache)
    ds = FaceDataset(samples, train=train, repeat=repeat, resize=resize, root=root,
                     progress=progress, num_workers=num_workers)
    if cache is not None:
        ds.save_cache(cache)
    return ds


# --------------------------------------------------------------------------- LFW pairs

class Pair(NamedTuple):
    """One verification pair; `fold` counts from 0."""
    path_a: str
    path_b: str
    same: bool
    fold: int


def lfw_image_path(images_root: PathLike, name: str, index: int) -> str:
    return os.path.join(os.fspath(images_root), name, f"{name}_{index:04d}.jpg")


def _parse_index(token: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ValueError(f"{where}: image number {token!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{where}: image number {value} must be >= 1")
    return value


def read_pairs(path: PathLike, images_root: PathLike | None = None,
               check_exists: bool = True) -> list[Pair]:
    """Parse an LFW pairs file into `Pair`s (folds from 0).

    Header ``F<TAB>N`` (pairs.txt, View 2): F folds of N same-person then N different pairs.
    Header ``N`` (pairsDevTrain/DevTest, View 1): one fold, N same then N different.
    Lines: ``Name i j`` (same) and ``Name1 i Name2 j`` (different).  Images default to
    ``<dir of path>/images/{Name}/{Name}_{i:04d}.jpg``; with ``check_exists`` each must exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file not found: {path}")
    images_root = os.fspath(images_root) if images_root is not None else \
        os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}:1: empty pairs file (expected a header '10\\t300' or '500')")
    head = lines[0].split()
    try:
        n_folds, per = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
        if len(head) > 2 or n_folds < 1 or per < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"{path}:1: bad header {lines[0]!r}; expected 'FOLDS<TAB>PAIRS' "
                         f"(View 2) or 'PAIRS' (View 1)") from None
    body = lines[1:]
    if len(body) != 2 * per * n_folds:
        raise ValueError(f"{path}: header {lines[0]!r} announces {2 * per * n_folds} pair lines, "
                         f"found {len(body)}")
    pairs: list[Pair] = []
    for k, line in enumerate(body):
        lineno = k + 2
        where = f"{path}:{lineno}"
        fold, same = k // (2 * per), (k % (2 * per)) < per
        tok = line.split()
        if same and len(tok) == 3:
            a = lfw_image_path(images_root, tok[0], _parse_index(tok[1], where))
            b = lfw_image_path(images_root, tok[0], _parse_index(tok[2], where))
        elif not same and len(tok) == 4:
            a = lfw_image_path(images_root, tok[0], _parse_index(tok[1], where))
            b = lfw_image_path(images_root, tok[2], _parse_index(tok[3], where))
        else:
            want = "'Name i j' (same person)" if same else "'Name1 i Name2 j' (different people)"
            raise ValueError(f"{where}: malformed pair line {line!r}; expected {want} with "
                             f"tab-separated fields at this position of fold {fold}")
        if check_exists:
            for p in (a, b):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"image {p} named at {where} does not exist")
        pairs.append(Pair(a, b, same, fold))
    return pairs


def identity_of(path: PathLike) -> str:
    """LFW identity of an image path: its folder name."""
    return os.path.basename(os.path.dirname(os.fspath(path)))


def identities_in_pairs(pairs: Iterable[Pair]) -> set[str]:
    return {identity_of(p) for pair in pairs for p in (pair.path_a, pair.path_b)}


def pair_index(pairs: Sequence[Pair]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique image paths (sorted) and index arrays a, b so that pair i = (paths[a[i]], paths[b[i]]).

    Embed each image once, then score pairs by indexing (7,701 images instead of 12,000).
    """
    paths = sorted({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    where = {p: i for i, p in enumerate(paths)}
    a = np.array([where[pair.path_a] for pair in pairs], dtype=np.int64)
    b = np.array([where[pair.path_b] for pair in pairs], dtype=np.int64)
    return paths, a, b


def _train_identities(lfw_root: PathLike, excluded: set[str],
                      min_images_per_identity: int) -> dict[str, list[str]]:
    found = scan_identity_folders(os.path.join(os.fspath(lfw_root), "images"),
                                  min_images_per_identity=min_images_per_identity)
    return {name: paths for name, paths in found if name not in excluded}


def view2_fold_split(lfw_root: PathLike, fold: int, min_images_per_identity: int = 2
                     ) -> tuple[dict[str, list[str]], list[Pair]]:
    """Identity-disjoint split for View 2 fold ``fold`` (0-9): (train identities, test pairs).

    Train = every identity absent from fold ``fold``'s pairs, including identities in no pair.
    ``min_images_per_identity`` defaults to 2 because a one-image identity gives a margin loss
    no positive pair to pull together; pass 1 to keep them.
    """
    pairs = read_pairs(os.path.join(os.fspath(lfw_root), "pairs.txt"))
    n_folds = max(p.fold for p in pairs) + 1
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    test = [p for p in pairs if p.fold == fold]
    return _train_identities(lfw_root, identities_in_pairs(test), min_images_per_identity), test


def view1_split(lfw_root: PathLike, min_images_per_identity: int = 2
                ) -> tuple[dict[str, list[str]], list[Pair]]:
    """View 1: train on every identity absent from pairsDevTest.txt, test on its 1,000 pairs."""
    test = read_pairs(os.path.join(os.fspath(lfw_root), "pairsDevTest.txt"))
    return _train_identities(lfw_root, identities_in_pairs(test), min_images_per_identity), test
