"""The gallery: enrolled embeddings in SQLite, searched exactly on an in-memory torch matrix.

What is stored: subject id, one row per enrolled template (the L2-normalised float32
embedding as bytes) and timestamps.  Never X_p, never a face.  SQLite runs in WAL mode and every
enroll or delete is one transaction committed before the call returns, so a process killed
mid-enroll (kill -9) leaves the previous committed state, never a torn row.

Search: the embeddings live in one float32 matrix with a parallel subject index; a query is
one matrix-vector product, then a per-subject maximum (a subject's score is its best template).
The matrix is rebuilt from SQLite at start and updated in place on every change.  It is kept
column-major (a (D, capacity) buffer, templates as columns): on an AMD EPYC torch's (MKL)
matrix-vector product over that layout ran about twice as fast as over a row-major matrix.
The product stays in torch rather than NumPy's faster OpenBLAS, whose own worker threads kept
spinning after each search and halved the speed of the next f_p forward (docs/service.md).

Several processes may serve one gallery file on one machine (Ray Serve replicas): before every
query and change a process asks SQLite whether another connection committed since it last
looked (`PRAGMA data_version`) and, if so, appends the new rows, or reloads after a delete.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_subject ON templates(subject);
"""
MAX_SUBJECT_CHARS = 128


class GalleryError(ValueError):
    """A gallery file that does not fit this service (other embedding size, not a gallery)."""


class UnknownSubject(KeyError):
    """No template is enrolled under this subject id."""


@dataclass(frozen=True)
class Match:
    subject: str
    score: float


def template_buffer(capacity: int, dim: int) -> torch.Tensor:
    """Room for `capacity` templates, column-major: `buffer[:, :n].T` is the (n, D) matrix."""
    return torch.empty(dim, capacity)


def top_subjects(matrix: torch.Tensor, owner: torch.Tensor, n_subjects: int, vec: torch.Tensor,
                 k: int) -> list[tuple[int, float]]:
    """(subject index, score) of the k subjects whose best template is closest to `vec`:
    one (M, D) x (D,) product, a per-subject max (scatter), top-k; exact."""
    if matrix.shape[0] == 0 or k < 1:
        return []
    scores = matrix @ vec
    best = torch.full((n_subjects,), -2.0).scatter_reduce_(0, owner, scores, "amax")
    present = best > -2.0                    # a cosine is >= -1: -2 marks "no template"
    top = torch.topk(torch.where(present, best, torch.tensor(-3.0)), min(k, int(present.sum())))
    return list(zip(top.indices.tolist(), top.values.tolist()))


class Gallery:
    """Thread-safe: one lock around the SQLite connection and the matrix."""

    def __init__(self, path: str | Path, dim: int, model: str | None = None) -> None:
        """`model`: the served model's tag (weights digest and precision); a gallery keeps
        the first one it is opened with and refuses another (None: not checked)."""
        self.path = Path(path)
        self.dim = dim
        self.model = model
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")     # a committed enroll survives power loss
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise GalleryError(f"{self.path}: not a usable SQLite gallery ({e})") from e
        self._check_dim()
        self._check_model()
        self._version = self._data_version()
        self._load()

    def _check_dim(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('dim', ?)", (str(self.dim),))
        elif int(row[0]) != self.dim:
            raise GalleryError(f"{self.path}: gallery of {row[0]}-d embeddings, but this model "
                               f"embeds to {self.dim}-d (a gallery belongs to one bundle)")

    def _check_model(self) -> None:
        if self.model is None:
            return
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('model', ?)", (self.model,))
        row = self._db.execute("SELECT value FROM meta WHERE key='model'").fetchone()
        if row[0] != self.model:
            raise GalleryError(f"{self.path}: gallery enrolled with model {row[0]} (weights "
                               f"digest:precision), but the service runs {self.model}; templates "
                               "are only comparable with embeddings of the same weights at the "
                               "same precision (enroll again into a new gallery)")

    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _sync(self) -> None:
        """Catch up with commits of other connections (call with the lock held)."""
        version = self._data_version()
        if version == self._version:
            return
        self._version = version
        mark = self._seen_max
        self._db.execute("BEGIN")          # one read snapshot for the new rows and the count
        try:
            rows = self._db.execute("SELECT id, subject, embedding FROM templates WHERE id > ? "
                                    "ORDER BY id", (mark,)).fetchall()
            total = int(self._db.execute("SELECT COUNT(*) FROM templates").fetchone()[0])
        finally:
            self._db.execute("COMMIT")
        fresh = [r for r in rows if r[0] not in self._id_set]
        if total != self._n + len(fresh):            # something was deleted: start over
            self._load()
            return
        for row_id, subject, blob in fresh:
            self._ids.append(row_id)
            self._id_set.add(row_id)
            self._append(subject, torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()))
        self._seen_max = max([mark] + [r[0] for r in rows])

    def _load(self) -> None:
        rows = self._db.execute("SELECT id, subject, embedding FROM templates ORDER BY id").fetchall()
        self._ids = [r[0] for r in rows]
        self._id_set = set(self._ids)
        self._seen_max = self._ids[-1] if self._ids else 0
        self._subjects: list[str] = []           # subject of each distinct index
        self._subject_index: dict[str, int] = {}
        owners = []
        for _, subject, _ in rows:
            owners.append(self._index_of(subject))
        n = len(rows)
        self._n = n
        self._owner_buf = torch.zeros(max(16, n), dtype=torch.long)
        self._owner_buf[:n] = torch.tensor(owners, dtype=torch.long)
        self._buf = template_buffer(max(16, n), self.dim)
        if rows:
            data = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            self._buf[:, :n].numpy()[...] = data.reshape(n, self.dim).T   # read-only source

    @property
    def _matrix(self) -> torch.Tensor:
        """(M, D) view of the column-major buffer."""
        return self._buf[:, :self._n].T

    @property
    def _owner(self) -> torch.Tensor:
        return self._owner_buf[:self._n]

    def _append(self, subject: str, vec: torch.Tensor) -> None:
        """Amortised O(D) append: the buffers double when full."""
        if self._n == self._buf.shape[1]:
            grown = template_buffer(2 * self._buf.shape[1], self.dim)
            grown[:, :self._n] = self._buf[:, :self._n]
            self._buf = grown
            self._owner_buf = torch.cat([self._owner_buf, torch.zeros_like(self._owner_buf)])
        self._buf[:, self._n] = vec
        self._owner_buf[self._n] = self._index_of(subject)
        self._n += 1

    def _index_of(self, subject: str) -> int:
        if subject not in self._subject_index:
            self._subject_index[subject] = len(self._subjects)
            self._subjects.append(subject)
        return self._subject_index[subject]

    # ------------------------------------------------------------------ changes

    def enroll(self, subject: str, embedding: torch.Tensor) -> int:
        """Add one template; returns the subject's template count.  Committed on return."""
        vec = self._vector(embedding)
        with self._lock:
            self._sync()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO templates (subject, embedding, created_at) VALUES (?, ?, ?)",
                    (subject, vec.numpy().tobytes(), time.time()))
                count = self._db.execute("SELECT COUNT(*) FROM templates WHERE subject=?",
                                         (subject,)).fetchone()[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._ids.append(cur.lastrowid)
            self._id_set.add(cur.lastrowid)
            self._append(subject, vec)
            return int(count)

    def enroll_many(self, subjects: list[str], embeddings: torch.Tensor) -> None:
        """Add one template per (subject, row) in ONE transaction: all or nothing (imports,
        benchmarks)."""
        if len(subjects) != embeddings.shape[0]:
            raise ValueError(f"{len(subjects)} subjects for {embeddings.shape[0]} embeddings")
        vecs = torch.nn.functional.normalize(embeddings.float().reshape(len(subjects), self.dim),
                                             dim=1).contiguous()
        if not bool(torch.isfinite(vecs).all()):
            raise ValueError("embeddings hold NaN or infinite values")
        now = time.time()
        rows = ((s, v.tobytes(), now) for s, v in zip(subjects, vecs.numpy()))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO templates (subject, embedding, created_at) "
                                     "VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._version = self._data_version()
            self._load()

    def delete(self, subject: str) -> int:
        """Remove every template of `subject`; `UnknownSubject` if it has none."""
        with self._lock:
            self._sync()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute("DELETE FROM templates WHERE subject=?", (subject,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._version = self._data_version()
            if n == 0:
                raise UnknownSubject(subject)
            self._load()
            return int(n)

    # ------------------------------------------------------------------ queries

    def _vector(self, embedding: torch.Tensor) -> torch.Tensor:
        vec = torch.as_tensor(embedding, dtype=torch.float32).reshape(-1)
        if vec.numel() != self.dim or not bool(torch.isfinite(vec).all()):
            raise ValueError(f"expected a finite {self.dim}-d embedding")
        return torch.nn.functional.normalize(vec, dim=0).contiguous()

    def verify(self, subject: str, embedding: torch.Tensor) -> float:
        """Best cosine between `embedding` and the subject's templates."""
        vec = self._vector(embedding)
        with self._lock:
            self._sync()
            index = self._subject_index.get(subject)
            rows = (self._owner == index).nonzero().view(-1) if index is not None else None
            if rows is None or rows.numel() == 0:
                raise UnknownSubject(subject)
            return float((self._matrix[rows] @ vec).max())

    def identify(self, embedding: torch.Tensor, k: int) -> list[Match]:
        """The k subjects with the best template cosine, best first (exact search)."""
        vec = self._vector(embedding)
        with self._lock:
            self._sync()
            return [Match(self._subjects[i], s) for i, s in
                    top_subjects(self._matrix, self._owner, len(self._subjects), vec, k)]

    def counts(self) -> tuple[int, int]:
        """(subjects, templates)."""
        with self._lock:
            self._sync()
            return len(torch.unique(self._owner)), int(self._matrix.shape[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
