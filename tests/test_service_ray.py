"""`minusfed serve --replicas 2`: the recognition app as a Ray Serve deployment (slow).

A real local Ray and Ray Serve, started by the `minusfed serve` process the test starts (HTTPS
and tokens on, loopback); two replicas share one SQLite gallery.  Faces enrolled through
whichever replica answers are identified by every replica, both replicas answer, a wrong token
is refused, and SIGTERM shuts Serve and Ray down (exit 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation.service.payload import npy_bytes
from tests.service_server import Service, make_bundle

pytestmark = pytest.mark.slow


def test_two_replicas_share_the_gallery_and_shut_down_cleanly(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    svc = Service(tmp_path, bundle / "server", tmp_path / "gallery.db",
                  extra=["--replicas", "2", "--replica-cpus", "0.5"])
    try:
        svc.wait(timeout=300)
        rng = np.random.default_rng(0)
        faces = [rng.random((3, 112, 112), dtype=np.float32) for _ in range(6)]
        head = {"Content-Type": "application/x-npy"}
        processes = set()
        with svc.http() as h:
            for i, face in enumerate(faces):
                r = h.post(f"/v1/subjects/zq-{i}/enroll", content=npy_bytes(face), headers=head)
                assert r.status_code == 200, r.text
            for _ in range(5):                  # Serve spreads these over both replicas
                for i, face in enumerate(faces):
                    r = h.post("/v1/identify", content=npy_bytes(face), headers=head, params={"k": 1})
                    assert r.status_code == 200, r.text
                    assert r.json()["candidates"][0]["subject"] == f"zq-{i}"
                for _ in range(4):
                    card = h.get("/v1/card").json()
                    assert card["gallery"] == {"subjects": 6, "templates": 6}
                    processes.add(card["process"])
            r = h.delete("/v1/subjects/zq-0")
            assert r.status_code == 200
            for _ in range(6):                  # every replica sees the delete
                r = h.post("/v1/subjects/zq-0/verify", content=npy_bytes(faces[0]), headers=head)
                assert r.status_code == 404, r.text
        assert len(processes) == 2, f"one replica answered everything: {processes}"
        with svc.http(token="wrong") as h:
            assert h.get("/v1/card").status_code == 401
    finally:
        code = svc.stop(timeout=90)
    assert code == 0, svc.log()[-3000:]
    # the banner follows serve.run's return, which may come after the proxy already answers
    assert "with 2 Ray Serve replica(s)" in svc.log()
    assert "zq-" not in svc.log()                                   # no subject ids logged
    serve_logs = Path("/tmp/ray/session_latest/logs/serve")           # the replicas' own logs
    for log in serve_logs.glob("*") if serve_logs.is_dir() else []:
        assert "zq-" not in log.read_text(errors="replace"), log
