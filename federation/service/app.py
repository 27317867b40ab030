"""The recognition service: a bundle's f_p behind an HTTP API that only ever sees X_p.

Endpoints (docs/service.md), all under /v1, all but /v1/health need `Authorization: Bearer
TOKEN` of a site in the tokens file (when the service runs with one):

    GET    /v1/health                          {"status": "ok"}
    GET    /v1/card                            the bundle's model card
    POST   /v1/embed                           batch X_p -> L2-normalised embeddings
    POST   /v1/subjects/{id}/enroll            one face's X_p -> template stored
    POST   /v1/subjects/{id}/verify            one face's X_p -> score, decision at the FAR
    POST   /v1/identify?k=5                    one face's X_p -> top-k subjects with scores
    DELETE /v1/subjects/{id}                   every template of the subject removed

Privacy: X_p is parsed, embedded and dropped; only the embedding reaches the gallery.  No
request body, subject id or embedding is ever logged: uvicorn's access log is off and the
service logs one line per request with the route template, status, site and time.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from federation.service import torch_thread
from federation.service.auth import TokenCheck
from federation.service.gallery import Gallery, UnknownSubject
from federation.service.model import Embedder, ServedModel
from federation.service.payload import (
    NPY,
    PayloadError,
    batch_views,
    face_views,
    npy_bytes,
    parse_body,
)
from task.bundle import FAR_KEYS

log = logging.getLogger("minusfed.service")
SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
DEFAULT_MAX_BODY = 8 * 1024 * 1024          # 26 float32 faces with both views, or 55 float16
MAX_EMBED_FACES = 64
MAX_K = 100


@dataclass
class ServiceSettings:
    far: str = "1e-3"                        # the operator's operating point for decisions
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_embed_faces: int = MAX_EMBED_FACES
    cpu_compile: bool = False                # inductor-compiled f_p where it wins (warm-up first)

    def __post_init__(self) -> None:
        if self.far not in FAR_KEYS:
            raise ValueError(f"far: expected one of {', '.join(FAR_KEYS)}, got {self.far!r}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: expected >= 1024, got {self.max_body_bytes}")


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(served: ServedModel, gallery: Gallery, tokens: TokenCheck | None,
               settings: ServiceSettings | None = None) -> FastAPI:
    """The ASGI app; `tokens` None serves without authentication (development only)."""
    settings = settings or ServiceSettings()
    bundle = served.bundle
    embedder = Embedder(served, compile=settings.cpu_compile)
    if settings.cpu_compile:
        torch_thread.call(embedder.warm_up)
    threshold = served.threshold(settings.far)
    app = FastAPI(title="minusfed recognition service", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        site = None
        try:
            if request.url.path != "/v1/health" and tokens is not None:
                auth = request.headers.get("authorization", "")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
                site = tokens.site_of(token)
                if site is None:
                    raise Refusal(401, "missing or wrong API token (Authorization: Bearer TOKEN)")
            request.state.site = site
            response = await call_next(request)
        except Refusal as r:
            response = _error(r.status, r.message)
        route = request.scope.get("route")
        log.info("%s %s -> %d site=%s %.1f ms", request.method,
                 getattr(route, "path", "(no route)"), response.status_code, site,
                 1000 * (time.perf_counter() - t0))
        return response

    @app.exception_handler(Refusal)
    async def refused(_request: Request, r: Refusal) -> JSONResponse:
        return _error(r.status, r.message)

    async def read_xp(request: Request) -> torch.Tensor | object:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > settings.max_body_bytes):
            raise Refusal(413, f"body of {declared} bytes; the limit is "
                               f"{settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise Refusal(413, f"body larger than the limit of {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return parse_body(b"".join(chunks), request.headers.get("content-type"))
        except PayloadError as e:
            raise Refusal(e.status, str(e)) from None

    def subject_id(value: str) -> str:
        if not SUBJECT.fullmatch(value):
            raise Refusal(422, "subject id: expected 1-128 characters: letters, digits and "
                               "'.', '_', ':', '@', '-' (not starting with a symbol)")
        return value

    async def one_face(request: Request) -> torch.Tensor:
        try:
            views = face_views(await read_xp(request))
        except PayloadError as e:
            raise Refusal(e.status, str(e)) from None
        return (await torch_thread.run(embedder, views[None]))[0]

    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/card")
    async def card() -> dict:
        subjects, templates = await torch_thread.run(gallery.counts)
        return {"card": bundle.card, "far": settings.far, "threshold": _num(threshold),
                "embedding-size": bundle.embedding_size, "smoke": bundle.smoke,
                "precision": served.precision,
                "process": os.getpid(),      # which replica answered (Ray Serve)
                "gallery": {"subjects": subjects, "templates": templates}}

    @app.post("/v1/embed")
    async def embed(request: Request) -> Response:
        try:
            views = batch_views(await read_xp(request), settings.max_embed_faces)
        except PayloadError as e:
            raise Refusal(e.status, str(e)) from None
        emb = await torch_thread.run(embedder, views)
        if NPY in request.headers.get("accept", ""):      # float32 .npy: no float formatting
            return Response(npy_bytes(emb.numpy()), media_type=NPY)
        # JSONResponse skips FastAPI's jsonable_encoder, which walks every float
        return JSONResponse({"embeddings": emb.tolist(), "dim": int(emb.shape[1])})

    @app.post("/v1/subjects/{subject}/enroll")
    async def enroll(subject: str, request: Request) -> dict:
        subject = subject_id(subject)
        emb = await one_face(request)
        count = await torch_thread.run(gallery.enroll, subject, emb)
        return {"subject": subject, "templates": count}

    @app.post("/v1/subjects/{subject}/verify")
    async def verify(subject: str, request: Request) -> dict:
        subject = subject_id(subject)
        emb = await one_face(request)
        try:
            score = await torch_thread.run(gallery.verify, subject, emb)
        except UnknownSubject:
            raise Refusal(404, "unknown subject: nothing is enrolled under this id") from None
        return {"subject": subject, "score": score, "match": score >= threshold,
                "far": settings.far, "threshold": _num(threshold)}

    @app.post("/v1/identify")
    async def identify(request: Request, k: int = 5) -> dict:
        if not 1 <= k <= MAX_K:
            raise Refusal(422, f"k: expected 1..{MAX_K}, got {k}")
        emb = await one_face(request)
        matches = await torch_thread.run(gallery.identify, emb, k)
        return {"candidates": [{"subject": m.subject, "score": m.score,
                                "match": m.score >= threshold} for m in matches],
                "far": settings.far, "threshold": _num(threshold)}

    @app.delete("/v1/subjects/{subject}")
    async def delete(subject: str) -> dict:
        subject = subject_id(subject)
        try:
            n = await torch_thread.run(gallery.delete, subject)
        except UnknownSubject:
            raise Refusal(404, "unknown subject: nothing is enrolled under this id") from None
        return {"subject": subject, "deleted": n}

    return app


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None
