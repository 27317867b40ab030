"""The server's spool of pooled-stage-2 uploads: what each site shipped, on disk, once.

Layout under `<out-dir>/pooled/spool/` (one folder per site token, hex):

  <site>/chunk-000007.xp.npy       float16 (n, 3, 112, 112): X_p of the chunk, as shipped
  <site>/chunk-000007.labels.npy   int64 (n,): the site's pseudonymous label tokens
  <site>/chunk-000007.json         what the site said about the chunk; written last, so a chunk
                                   counts only once all three files are whole

Each file is written atomically, owner-only (0600, folders 0700), and never replaced: the first
complete answer for a chunk is the one kept, so a chunk asked for again after a dropped
connection or a restarted ServerApp adds nothing (the site re-protects it with new
permutations; those copies are discarded).
The arrays are plain .npy read with `allow_pickle=False` and memory-mapped by the trainers, so
several Ray Train workers on one machine share the page cache instead of holding copies.

`check_upload` is the server's screening of a reply (a hostile or broken site): exact dtypes
and shapes, finite values in [0, 1], labels one per image, numbers consistent with the request
and with the site's earlier chunks, and within `max_images`.  A reply that fails is refused
with the reason; nothing of it is written.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minusface.atomic import write_atomic

IMAGE_SHAPE = (3, 112, 112)
_CHUNK = re.compile(r"^chunk-(\d{6})\.json$")
_SITE = re.compile(r"^[0-9a-f]{16}$")


class UploadError(ValueError):
    """A site's upload reply that the server refuses (the message says why)."""


@dataclass(frozen=True)
class Upload:
    """One screened chunk: X_p, label tokens and what the site said about them."""

    site: str                      # the site token as 16 hex digits
    chunk: int
    chunks: int
    images: int                    # the site's own faces in this chunk
    copies: int
    identities: int
    xp: np.ndarray                 # float16 (images * copies, 3, 112, 112)
    labels: np.ndarray             # int64 (images * copies,)

    @property
    def nbytes(self) -> int:
        return int(self.xp.nbytes + self.labels.nbytes)


def site_name(token: int) -> str:
    return f"{int(token) & ((1 << 64) - 1):016x}"


def check_upload(xp: np.ndarray, labels: np.ndarray, said: Mapping[str, object], *, chunk: int,
                 chunk_images: int, copies: int, max_images: int,
                 known_chunks: int | None = None) -> Upload:
    """Screen one upload reply against the request; `UploadError` names what is wrong."""
    def number(key: str) -> int:
        value = said.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UploadError(f"metric {key!r} is {type(value).__name__}, expected an int")
        return int(value)

    got = {k: number(k) for k in ("chunk", "chunks", "images", "copies", "identities",
                                  "site-token")}
    if got["chunk"] != chunk:
        raise UploadError(f"answered chunk {got['chunk']}, asked for {chunk}")
    if got["copies"] != copies:
        raise UploadError(f"sent {got['copies']} copies per face, asked for {copies}")
    if not 1 <= got["images"] <= chunk_images:
        raise UploadError(f"says {got['images']} faces, a chunk holds 1..{chunk_images}")
    if not 1 <= got["chunks"] <= math.ceil(max_images / chunk_images) or chunk >= got["chunks"]:
        raise UploadError(f"says {got['chunks']} chunk(s) (at most "
                          f"{math.ceil(max_images / chunk_images)} of {chunk_images} faces)")
    if known_chunks is not None and got["chunks"] != known_chunks:
        raise UploadError(f"says {got['chunks']} chunk(s), earlier {known_chunks}")
    if got["chunk"] < got["chunks"] - 1 and got["images"] != chunk_images:
        raise UploadError(f"chunk {chunk} of {got['chunks']} holds {got['images']} faces, "
                          f"only the last may hold fewer than {chunk_images}")
    if not 1 <= got["identities"] <= max_images or got["site-token"] <= 0:
        raise UploadError("identity count or site token out of range")
    n = got["images"] * copies
    if not isinstance(xp, np.ndarray) or xp.dtype != np.float16 or xp.shape != (n, *IMAGE_SHAPE):
        raise UploadError(f"X_p must be float16 {(n, *IMAGE_SHAPE)}, got "
                          f"{getattr(xp, 'dtype', type(xp).__name__)} {getattr(xp, 'shape', '')}")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (n,):
        raise UploadError(f"labels must be int64 ({n},), got {getattr(labels, 'dtype', '?')} "
                          f"{getattr(labels, 'shape', '')}")
    lo, hi = (float(v) for v in (np.min(xp), np.max(xp)))      # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
        raise UploadError(f"X_p values must be finite in [0, 1], got [{lo}, {hi}]")
    distinct = np.unique(labels)
    if distinct.size > got["identities"] or (labels <= 0).any():
        raise UploadError(f"{distinct.size} label tokens in the chunk for {got['identities']} "
                          "identities, or a token <= 0")
    return Upload(site_name(got["site-token"]), chunk, got["chunks"], got["images"], copies,
                  got["identities"], xp, labels)


@dataclass(frozen=True)
class SiteUploads:
    """What the spool holds of one site."""

    site: str
    chunks: int                    # the site's whole upload
    have: tuple[int, ...]          # chunk indices on disk
    images: int
    copies: int
    identities: int
    xp_images: int
    nbytes: int
    nodes: tuple[int, ...]         # node ids that answered (a restarted SuperNode gets a new one)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks


class Spool:
    """`<out-dir>/pooled/spool`: write screened uploads once, list and read them back."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _base(self, site: str, chunk: int) -> Path:
        if not _SITE.match(site):
            raise ValueError(f"site token {site!r} is not 16 hex digits")
        return self.root / site / f"chunk-{int(chunk):06d}"

    def has(self, site: str, chunk: int) -> bool:
        return self._base(site, chunk).with_suffix(".json").is_file()

    def put(self, upload: Upload, node: int) -> bool:
        """Write `upload` unless that chunk is already whole on disk; True if written."""
        base = self._base(upload.site, upload.chunk)
        if base.with_suffix(".json").is_file():
            return False
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        base.parent.mkdir(exist_ok=True, mode=0o700)
        for suffix, array in ((".xp.npy", upload.xp), (".labels.npy", upload.labels)):
            data = io.BytesIO()
            np.save(data, array, allow_pickle=False)
            write_atomic(base.with_name(base.name + suffix), lambda f, b=data: f.write(b.getvalue()),
                         mode=0o600)
        meta = {"chunk": upload.chunk, "chunks": upload.chunks, "images": upload.images,
                "copies": upload.copies, "identities": upload.identities,
                "xp_images": int(upload.xp.shape[0]), "bytes": upload.nbytes, "node": int(node)}
        try:
            write_atomic(base.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()),
                         replace=False, mode=0o600)
        except FileExistsError:
            return False                  # another answer finished first: keep that one
        return True

    def sites(self) -> dict[str, SiteUploads]:
        """Every site with at least one whole chunk."""
        out: dict[str, SiteUploads] = {}
        if not self.root.is_dir():
            return out
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _SITE.match(p.name)):
            metas = []
            for f in sorted(folder.iterdir()):
                if _CHUNK.match(f.name):
                    try:
                        metas.append(json.loads(f.read_text(encoding="utf-8")))
                    except (OSError, ValueError):
                        continue
            if not metas:
                continue
            out[folder.name] = SiteUploads(
                folder.name, int(metas[0]["chunks"]), tuple(int(m["chunk"]) for m in metas),
                sum(int(m["images"]) for m in metas), int(metas[0]["copies"]),
                int(metas[0]["identities"]), sum(int(m["xp_images"]) for m in metas),
                sum(int(m["bytes"]) for m in metas),
                tuple(sorted({int(m["node"]) for m in metas})))
        return out

    def chunk_files(self, site: str) -> list[tuple[Path, Path]]:
        """(X_p file, labels file) of every whole chunk of `site`, in chunk order."""
        return [(self._base(site, c).with_name(f"chunk-{c:06d}.xp.npy"),
                 self._base(site, c).with_name(f"chunk-{c:06d}.labels.npy"))
                for c in sorted(self.sites()[site].have)]


class PooledData:
    """The X_p of some sites' spools as one indexable set with class ids 0..K-1.

    Classes are (site, label token) pairs, numbered in sorted order, so the same spool always
    gives the same numbering.  X_p stays memory-mapped; `batch(rows)` reads just those rows."""

    def __init__(self, spool_root: str | Path, sites: list[str]) -> None:
        spool = Spool(spool_root)
        self.xp: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        for k, site in enumerate(sorted(sites)):
            for xp_file, label_file in spool.chunk_files(site):
                xp = np.load(xp_file, mmap_mode="r", allow_pickle=False)
                labels = np.load(label_file, allow_pickle=False)
                if xp.dtype != np.float16 or xp.shape[1:] != IMAGE_SHAPE or labels.shape != xp.shape[:1]:
                    raise ValueError(f"{xp_file}: not a spool chunk (X_p {xp.dtype} {xp.shape}, "
                                     f"labels {labels.shape})")
                self.xp.append(xp)
                tokens.append(labels.astype(np.int64))
                owners.append(np.full(len(labels), k, dtype=np.int64))
        if not self.xp:
            raise ValueError(f"no spooled X_p under {spool_root} for sites {sites}")
        pairs = np.stack([np.concatenate(owners), np.concatenate(tokens)], axis=1)
        classes, self.labels = np.unique(pairs, axis=0, return_inverse=True)
        self.labels = self.labels.reshape(-1).astype(np.int64)
        self.num_classes = int(len(classes))
        sizes = np.array([len(x) for x in self.xp])
        self._file = np.repeat(np.arange(len(sizes)), sizes)
        self._row = np.concatenate([np.arange(s) for s in sizes])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 X_p (len(rows), 3, 112, 112), int64 class ids) of global rows `rows`."""
        out = np.empty((len(rows), *IMAGE_SHAPE), dtype=np.float32)
        for i, r in enumerate(rows):
            out[i] = self.xp[self._file[r]][self._row[r]]
        return out, self.labels[rows]
