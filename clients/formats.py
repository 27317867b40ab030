"""Face data in the formats people hold it in: the LFW archive, insightface `.bin` and `.rec`.

- `prepare_lfw`: from the official `lfw.tgz` (250x250 originals, `lfw/<Name>/<Name>_NNNN.jpg`)
  and the official pair files, the 112x112 centre-crop folder this project reads
  (`images/<Name>/<Name>_NNNN.jpg`, pair files, SHA256SUMS), with the recipe of the shared
  copy's MANIFEST.md: RGB, crop box (50, 50, 200, 200), Pillow LANCZOS to 112x112, JPEG quality
  90 with optimize.  The archive is read member by member; nothing is extracted by path.
- `read_verification_bin`: insightface verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin),
  which are pickles of (list of encoded images, list or bool array of "same" flags).  A pickle
  can run code when loaded, so they are read by an unpickler that only builds that structure.
- `RecordIO` / `read_rec_faces`: insightface training sets (`train.rec` + `train.idx`, e.g.
  MS1MV2) in MXNet's RecordIO format, parsed directly (no MXNet).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clients.data import read_pairs

PathLike = str | os.PathLike

# --------------------------------------------------------------------------- LFW archive

CROP_BOX = (50, 50, 200, 200)          # MANIFEST.md "Preprocessing"
SIZE = 112
ORIGINAL = (250, 250)
JPEG = {"quality": 90, "optimize": True}
PAIR_FILES = ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt")
# md5 of the official pair files (MANIFEST.md; the values torchvision records)
OFFICIAL_MD5 = {"pairs.txt": "9f1ba174e4e1c508ff7cdf10ac338a7d",
                "pairsDevTrain.txt": "4f27cbf15b2da4a85c1907eb4181ad21",
                "pairsDevTest.txt": "5132f7440eb68cf58910c8a45a2ac10b"}
_MEMBER = re.compile(r"(?:[^/]+/)?([^/.][^/]*)/\1_(\d{4})\.jpg")


def centre_crop(image: Image.Image) -> Image.Image:
    """One LFW original (250x250) as the project's 112x112 centre crop."""
    if image.size != ORIGINAL:
        raise ValueError(f"expected a {ORIGINAL[0]}x{ORIGINAL[1]} LFW original, got "
                         f"{image.size[0]}x{image.size[1]}")
    return image.convert("RGB").crop(CROP_BOX).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def encode_crop(data: bytes) -> bytes:
    """JPEG bytes of the crop of the original whose file bytes are `data`."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        crop = centre_crop(im)
    out = io.BytesIO()
    crop.save(out, format="JPEG", **JPEG)
    return out.getvalue()


@dataclass
class PreparedLfw:
    out: Path
    images: int
    identities: int
    pair_files: list[str]
    ignored: list[str]                 # archive members that are not LFW images (named once)
    unofficial: list[str]              # pair files whose md5 is not the official one


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256sums(root: Path) -> Path:
    """SHA256SUMS of every file under `root` but itself and MANIFEST.md, sorted by path
    (`sha256sum -c SHA256SUMS` checks it)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name not in ("SHA256SUMS", "MANIFEST.md"))
    path = root / "SHA256SUMS"
    path.write_text("".join(f"{_sha256(root / f)}  {f}\n" for f in files), encoding="utf-8")
    return path


def prepare_lfw(archive: PathLike, out: PathLike, pair_files: list[PathLike],
                progress: bool = True) -> PreparedLfw:
    """Build the 112x112 centre-crop LFW folder at `out` (which must not exist yet) from the
    LFW archive and pair files.  Built in `out`.partial and renamed at the end, so an
    interrupted run leaves no folder that looks complete."""
    archive, out = Path(archive), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: prepare-lfw writes a new folder and never "
                              "overwrites one; choose another OUT or move it away")
    names = [Path(p).name for p in pair_files]
    if "pairs.txt" not in names:
        raise ValueError("prepare-lfw needs the official pairs.txt (View 2) among the pair files; "
                         f"got {names or 'none'}")
    if len(set(names)) != len(names):
        raise ValueError(f"pair files with the same name: {names}")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)                   # our own leftover from an interrupted run
    images = partial / "images"
    images.mkdir(parents=True)
    ignored: list[str] = []
    count = 0
    people: set[str] = set()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in tqdm(members, desc="LFW images", unit="file", disable=not progress):
            match = _MEMBER.fullmatch(member.name)
            if member.isdir():
                continue
            if not member.isfile() or match is None:
                ignored.append(member.name)      # links, devices, other files: never followed
                continue
            person = match.group(1)
            f = tar.extractfile(member)
            if f is None:
                ignored.append(member.name)
                continue
            try:
                data = encode_crop(f.read())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{archive}: member {member.name}: {exc}") from None
            target = images / person / f"{person}_{match.group(2)}.jpg"
            if target.exists():
                raise ValueError(f"{archive}: {target.relative_to(partial)} occurs twice")
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(data)
            count += 1
            people.add(person)
    if count == 0:
        shutil.rmtree(partial)
        raise ValueError(f"{archive}: no LFW images (expected members lfw/<Name>/<Name>_NNNN.jpg)")
    unofficial = []
    for src in map(Path, pair_files):
        shutil.copyfile(src, partial / src.name)          # byte for byte
        read_pairs(partial / src.name, images_root=images)  # parses; its images are present
        digest = hashlib.md5(src.read_bytes()).hexdigest()
        if src.name in OFFICIAL_MD5 and digest != OFFICIAL_MD5[src.name]:
            unofficial.append(src.name)
    write_sha256sums(partial)
    partial.rename(out)
    return PreparedLfw(out, count, len(people), sorted(names), ignored, unofficial)


# --------------------------------------------------------------------------- insightface .bin

class UnsafeFileError(ValueError):
    """The file asks for something a face verification set never holds."""


# what numpy needs to rebuild a bool array; nothing else may be named in the file
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


def _latin1_bytes(text: object, encoding: object = "utf-8") -> bytes:
    """What Python 3's protocol-2 pickles call (`_codecs.encode`) to rebuild a bytes object."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeFileError("_codecs.encode is allowed only as pickle's latin1 bytes rebuild")
    return text.encode("latin1")


class _VerificationUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in _ARRAY_GLOBALS:
            raise UnsafeFileError(f"the file refers to {module}.{name}; a verification set holds "
                                  "only a list of image bytes and a list or array of bools")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeFileError("the file uses persistent ids; a verification set has none")


@dataclass
class VerificationSet:
    images: list[bytes]            # encoded images, pair k is images[2k], images[2k + 1]
    same: np.ndarray               # (len(images) // 2,) bool

    def decode(self, index: int) -> np.ndarray:
        """Image `index` as uint8 (H, W, 3) RGB."""
        with Image.open(io.BytesIO(self.images[index])) as im:
            return np.asarray(im.convert("RGB"))


def read_verification_bin(path: PathLike) -> VerificationSet:
    """An insightface verification set (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...), without
    running anything the file could ask for."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _VerificationUnpickler(f, encoding="bytes").load()
    except UnsafeFileError as exc:
        raise UnsafeFileError(f"{path}: refused: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an insightface verification set ({exc})") from None
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pair (images, same flags), got {type(obj).__name__}")
    bins, flags = obj
    if isinstance(bins, np.ndarray) and bins.dtype == object:
        bins = list(bins)
    if not isinstance(bins, list) or not all(isinstance(b, bytes | bytearray | np.bytes_)
                                              for b in bins):
        raise ValueError(f"{path}: expected a list of encoded images (bytes) first")
    if isinstance(flags, np.ndarray):
        if flags.dtype != np.bool_ or flags.ndim != 1:
            raise ValueError(f"{path}: expected the same flags as a 1-d bool array, got "
                             f"{flags.dtype} of shape {flags.shape}")
        same = flags.copy()
    elif isinstance(flags, list) and all(isinstance(v, bool) for v in flags):
        same = np.array(flags, dtype=bool)
    else:
        raise ValueError(f"{path}: expected the same flags as a list of bools second")
    if len(bins) != 2 * len(same):
        raise ValueError(f"{path}: {len(bins)} images for {len(same)} pairs; expected two per pair")
    return VerificationSet([bytes(b) for b in bins], same)


# --------------------------------------------------------------------------- MXNet RecordIO

MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")       # flag, label, id, id2 (MXNet's IRHeader)


@dataclass
class RecordHeader:
    flag: int                      # > 0: `label` holds that many floats
    label: float | tuple[float, ...]
    id: int
    id2: int


def unpack_record(record: bytes) -> tuple[RecordHeader, bytes]:
    """(header, payload) of one image record (MXNet's recordio.unpack)."""
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than its header")
    flag, label, id1, id2 = _HEADER.unpack_from(record)
    payload = record[_HEADER.size:]
    if flag > 0:
        if len(payload) < 4 * flag:
            raise ValueError(f"record header says {flag} labels but holds {len(payload)} bytes")
        labels = struct.unpack_from(f"<{flag}f", payload)
        return RecordHeader(flag, labels, id1, id2), payload[4 * flag:]
    return RecordHeader(flag, label, id1, id2), payload


class RecordIO:
    """An MXNet indexed RecordIO pair (`.rec` + `.idx`) read directly."""

    def __init__(self, rec: PathLike, idx: PathLike | None = None) -> None:
        self.rec = Path(rec)
        self.idx_path = Path(idx) if idx is not None else self.rec.with_suffix(".idx")
        self.index: dict[int, int] = {}
        size = self.rec.stat().st_size
        for number, line in enumerate(self.idx_path.read_text(encoding="ascii").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
                if len(parts) != 2 or not 0 <= offset < size:
                    raise ValueError
            except (ValueError, IndexError):
                raise ValueError(f"{self.idx_path} line {number}: expected 'key<TAB>offset' with "
                                 f"an offset inside {self.rec.name} ({size} bytes), got {line!r}")\
                    from None
            self.index[key] = offset
        self._file = open(self.rec, "rb")  # noqa: SIM115 - closed by close() / the context

    def __enter__(self) -> RecordIO:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[int]:
        return sorted(self.index)

    def read(self, key: int) -> bytes:
        """Record `key`'s bytes; a record split around the magic number is joined again."""
        self._file.seek(self.index[key])
        parts: list[bytes] = []
        while True:
            head = self._file.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec}: record {key} is truncated")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec}: record {key}: bad magic number {magic:#x}")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = self._file.read(length)
            if len(data) < length:
                raise ValueError(f"{self.rec}: record {key} is truncated")
            self._file.read((-length) % 4)        # padding to 4 bytes
            # cflag: 0 a whole record; 1, 2, 3 its first, middle and last part
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise ValueError(f"{self.rec}: record {key}: unexpected part flag {cflag}")
            parts.append(data)
            if cflag == 0:
                return data
            if cflag == 3:
                return struct.pack("<I", MAGIC).join(parts)


def read_rec_faces(rec: PathLike, idx: PathLike | None = None
                   ) -> Iterator[tuple[int, int, bytes]]:
    """(record key, identity label, encoded image) of every face in an insightface training set.

    insightface's record 0 is a header whose labels give the end of the image records; records
    after it (identity ranges) are not faces.  Without such a header every record is a face."""
    with RecordIO(rec, idx) as r:
        keys = r.keys()
        if not keys:
            return
        first, payload = unpack_record(r.read(keys[0]))
        if first.flag > 0 and not payload:
            end = int(first.label[0])
            keys = [k for k in keys if 1 <= k < end]
        for key in keys:
            header, image = unpack_record(r.read(key))
            label = header.label[0] if isinstance(header.label, tuple) else header.label
            yield key, int(label), image


# --------------------------------------------------------------------------- conversions

def _jpeg_bytes(data: bytes, where: str) -> bytes:
    """`data` as a 112x112 JPEG: JPEG input is kept byte for byte, other formats re-encoded
    (quality 95)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.size != (SIZE, SIZE):
            raise ValueError(f"{where}: image is {im.size[0]}x{im.size[1]}, expected aligned "
                             f"{SIZE}x{SIZE} faces")
        if im.format == "JPEG":
            return data
        out = io.BytesIO()
        im.convert("RGB").save(out, format="JPEG", quality=95)
        return out.getvalue()


def _new_folder(out: Path) -> Path:
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new OUT folder (nothing is "
                              "overwritten)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def verification_to_folder(path: PathLike, out: PathLike, progress: bool = True) -> Path:
    """An insightface `.bin` verification set as an LFW-style folder (images/<name>/<name>_NNNN.jpg
    and a one-fold pairs.txt, same pairs first), which `data-path` and the server-side
    benchmark read.  Pair k's people are named bin_kNNNNN (same pair: images 1 and 2) or
    bin_kNNNNNa / bin_kNNNNNb (different pair)."""
    ds = read_verification_bin(path)
    n_same = int(ds.same.sum())
    if n_same * 2 != len(ds.same):
        raise ValueError(f"{path}: {n_same} same and {len(ds.same) - n_same} different pairs; "
                         "the LFW pairs.txt layout needs as many of each")
    out = Path(out)
    partial = _new_folder(out)
    lines: dict[bool, list[str]] = {True: [], False: []}
    for k in tqdm(range(len(ds.same)), desc="pairs", unit="pair", disable=not progress):
        same = bool(ds.same[k])
        names = [f"bin_k{k:05d}"] * 2 if same else [f"bin_k{k:05d}a", f"bin_k{k:05d}b"]
        numbers = [1, 2] if same else [1, 1]
        for j, (name, number) in enumerate(zip(names, numbers)):
            target = partial / "images" / name / f"{name}_{number:04d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_jpeg_bytes(ds.images[2 * k + j], f"{path} image {2 * k + j}"))
        lines[same].append(f"{names[0]}\t1\t2" if same else f"{names[0]}\t1\t{names[1]}\t1")
    (partial / "pairs.txt").write_text(
        "\n".join([f"1\t{n_same}", *lines[True], *lines[False]]) + "\n", encoding="utf-8")
    read_pairs(partial / "pairs.txt")                 # the folder reads back as LFW does
    write_sha256sums(partial)
    partial.rename(out)
    return out


def rec_to_folders(rec: PathLike, out: PathLike, idx: PathLike | None = None,
                   progress: bool = True) -> tuple[int, int]:
    """An insightface training set (.rec/.idx) as a folder-per-identity tree
    OUT/<label>/<key>.jpg, the layout a site's `data-path` holds; (images, identities)."""
    partial = _new_folder(Path(out))
    people: set[int] = set()
    count = 0
    for key, label, image in tqdm(read_rec_faces(rec, idx), desc="faces", unit="img",
                                  disable=not progress):
        folder = partial / f"{label:06d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{key:08d}.jpg").write_bytes(_jpeg_bytes(image, f"{rec} record {key}"))
        people.add(label)
        count += 1
    if count == 0:
        shutil.rmtree(partial)
        raise ValueError(f"{rec}: no face records")
    partial.rename(out)
    return count, len(people)
