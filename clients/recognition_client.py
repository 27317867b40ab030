"""The site side of the recognition service: protect faces locally, send only X_p.

`RecognitionClient` loads a bundle's site/ half (g), protects each face with a fresh CSPRNG
permutation per view (the face and its mirror image, as the run's server-side evaluation
embeds them) and sends the X_p to the service over HTTPS with the site's API token.  Before
anything leaves, the provenance check (`minusface.provenance.all_protected`, the outbound
guard's) confirms that every array sent is exactly a `protect()` output of this process: a raw
face, a residue or any other array is refused with `NotProtectedError`, nothing sent.

Wire format: float16 .npy by default (`dtype="float32"` for full precision, `"png"` for one
8-bit lossless PNG view); docs/service.md.
"""

from __future__ import annotations

import io
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from clients.data import load_image
from minusface.frontend import MinusFaceFrontend
from minusface.provenance import all_protected
from task.bundle import SiteBundle, read_site

WIRE = ("float16", "float32", "png")
TOKEN_ENV = "MINUSFED_SERVICE_TOKEN"


class NotProtectedError(RuntimeError):
    """An array about to be sent is not a protect() output of this process; nothing was sent."""


class ServiceError(RuntimeError):
    """The service refused a request (status and its error message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Verdict:
    subject: str
    score: float
    match: bool


def read_token(token_file: str | os.PathLike | None) -> str | None:
    """The API token from a file (first line) or $MINUSFED_SERVICE_TOKEN."""
    if token_file:
        text = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        return text[0].strip() if text else None
    return os.environ.get(TOKEN_ENV) or None


class RecognitionClient:
    def __init__(self, server: str, bundle: str | os.PathLike | SiteBundle, token: str | None,
                 ca_cert: str | os.PathLike | None = None, wire: str = "float16",
                 views: int = 2, timeout: float = 60.0) -> None:
        if wire not in WIRE:
            raise ValueError(f"wire: expected one of {', '.join(WIRE)}, got {wire!r}")
        if views not in (1, 2) or (wire == "png" and views != 1):
            raise ValueError("views: 1 or 2 (face, mirror); a PNG carries one view")
        self.site = bundle if isinstance(bundle, SiteBundle) else read_site(bundle)
        self.frontend = MinusFaceFrontend(generator=self.site.generator).eval()
        self.wire, self.views = wire, views
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, verify=verify,
                                 timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RecognitionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ protecting

    def protect(self, face: torch.Tensor) -> torch.Tensor:
        """(V, 3, 112, 112) X_p of one face (3, 112, 112) in [-1, 1]: fresh permutations."""
        faces = torch.stack([face, torch.flip(face, dims=(2,))])[: self.views]
        return self.frontend.protect(faces).cpu()

    def body(self, xp: torch.Tensor) -> tuple[bytes, str]:
        """The request body for X_p views, after the provenance check."""
        arr = xp.detach().to(torch.float32).contiguous().numpy()
        if arr.ndim != 4 or not all_protected(arr):
            raise NotProtectedError("refusing to send: the array is not an unmodified protect() "
                                    "output of this process (only X_p may leave the site)")
        if self.wire == "png":
            from PIL import Image

            from clients.protect_dir import to_png_array
            buf = io.BytesIO()
            Image.fromarray(to_png_array(xp[0])).save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        buf = io.BytesIO()
        np.save(buf, arr.astype(np.dtype(self.wire).newbyteorder("<")), allow_pickle=False)
        return buf.getvalue(), "application/x-npy"

    def _send(self, method: str, url: str, xp: torch.Tensor | None = None, **kw) -> dict:
        if xp is not None:
            content, kind = self.body(xp)
            kw.update(content=content, headers={"Content-Type": kind})
        r = self.http.request(method, url, **kw)
        if r.status_code != 200:
            try:
                message = r.json().get("error") or r.json().get("detail")
            except ValueError:
                message = r.text[:200]
            raise ServiceError(r.status_code, str(message))
        return r.json()

    @staticmethod
    def _face(face: torch.Tensor | str | os.PathLike) -> torch.Tensor:
        return face if isinstance(face, torch.Tensor) else load_image(face)

    # ------------------------------------------------------------------ API

    def health(self) -> dict:
        return self._send("GET", "/v1/health")

    def card(self) -> dict:
        return self._send("GET", "/v1/card")

    def enroll(self, subject: str, face: torch.Tensor | str | os.PathLike) -> int:
        xp = self.protect(self._face(face))
        return int(self._send("POST", f"/v1/subjects/{subject}/enroll", xp)["templates"])

    def verify(self, subject: str, face: torch.Tensor | str | os.PathLike) -> Verdict:
        r = self._send("POST", f"/v1/subjects/{subject}/verify", self.protect(self._face(face)))
        return Verdict(r["subject"], float(r["score"]), bool(r["match"]))

    def identify(self, face: torch.Tensor | str | os.PathLike, k: int = 5) -> list[Verdict]:
        r = self._send("POST", "/v1/identify", self.protect(self._face(face)), params={"k": k})
        return [Verdict(c["subject"], float(c["score"]), bool(c["match"]))
                for c in r["candidates"]]

    def delete(self, subject: str) -> int:
        return int(self._send("DELETE", f"/v1/subjects/{subject}")["deleted"])


def face_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named, and those under folders named (any depth, sorted)."""
    from clients.protect_dir import scan_folder

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(scan_folder(p)[0])
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such face image or folder")
    return out
