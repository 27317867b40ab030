"""Every torch call of the recognition service runs on one thread (federation/service/
torch_thread.py): f_p, the gallery and start-up code.  With handlers on a thread pool, each
thread that ran torch started its own OpenMP team and f_p slowed down about twofold."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np

from federation.service import torch_thread
from federation.service.app import create_app
from federation.service.gallery import Gallery
from federation.service.model import served_model
from federation.service.payload import npy_bytes
from tests.service_server import make_bundle


def test_call_from_the_torch_thread_does_not_deadlock():
    inner = torch_thread.call(lambda: torch_thread.call(threading.get_ident))
    assert inner == torch_thread.call(threading.get_ident) != threading.get_ident()


def test_every_torch_call_of_the_app_runs_on_the_torch_thread(tmp_path):
    bundle = make_bundle(tmp_path / "final")
    served = torch_thread.call(served_model, bundle / "server")
    gallery = torch_thread.call(Gallery, tmp_path / "gallery.db", served.bundle.embedding_size,
                                served.tag)
    seen: list[tuple[str, int]] = []
    served.model.register_forward_pre_hook(
        lambda *_: seen.append(("f_p", threading.get_ident())))
    for name in ("enroll", "verify", "identify", "counts", "delete"):
        method = getattr(gallery, name)

        def recorded(*args, _method=method, _name=name, **kw):
            seen.append((_name, threading.get_ident()))
            return _method(*args, **kw)
        setattr(gallery, name, recorded)
    app = create_app(served, gallery, tokens=None)
    face = npy_bytes(np.random.default_rng(0).random((2, 3, 112, 112), dtype=np.float32))
    npy = {"Content-Type": "application/x-npy"}

    async def drive() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://service") as h:
            for response in await asyncio.gather(      # concurrent, as under load
                    h.post("/v1/embed", content=face, headers=npy),
                    h.post("/v1/subjects/a/enroll", content=face, headers=npy),
                    h.post("/v1/subjects/b/enroll", content=face, headers=npy)):
                assert response.status_code == 200, response.text
            for call in (h.post("/v1/subjects/a/verify", content=face, headers=npy),
                         h.post("/v1/identify", content=face, headers=npy),
                         h.get("/v1/card"), h.delete("/v1/subjects/a")):
                response = await call
                assert response.status_code == 200, response.text

    asyncio.run(drive())
    assert {name for name, _ in seen} == {"f_p", "enroll", "verify", "identify", "counts",
                                          "delete"}
    assert {ident for _, ident in seen} == {torch_thread.call(threading.get_ident)}
    torch_thread.call(gallery.close)
