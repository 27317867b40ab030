"""The recognition service over real HTTPS on loopback: a `minusfed serve` process started by
the test (TLS, API tokens), a real SQLite gallery, the site client protecting faces itself."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clients.recognition_client import NotProtectedError, RecognitionClient, ServiceError
from federation.service.payload import npy_bytes
from task.bundle import read_server
from tests.service_server import ROOT, Service, make_bundle

XP = (3, 112, 112)


def synthetic_faces(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (mechanics only; no person)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 14, 14, generator=g)
    return (F.interpolate(low, size=112, mode="bilinear", align_corners=False) * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "final")


@pytest.fixture(scope="module")
def service(tmp_path_factory, bundle):
    tmp = tmp_path_factory.mktemp("service")
    svc = Service(tmp, bundle / "server", tmp / "gallery.db").wait()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service, bundle):
    with RecognitionClient(service.url, bundle / "site", service.token, ca_cert=service.ca,
                           wire="float32") as c:
        yield c


def offline_embedding(recognizer: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(recognizer(views).sum(dim=0), dim=0)


def test_tls_and_tokens_are_required(service):
    with service.http(token=None) as h:
        assert h.get("/v1/health").json() == {"status": "ok"}       # no secret in health
        r = h.get("/v1/card")
        assert r.status_code == 401 and "token" in r.json()["error"]
    with service.http(token="mfs_not-a-real-token") as h:
        assert h.get("/v1/card").status_code == 401
        assert h.post("/v1/subjects/x/enroll", content=b"x").status_code == 401
    with service.http() as h:
        card = h.get("/v1/card").json()
        assert card["smoke"] is True and card["far"] == "1e-3" and card["threshold"] == 0.8
    # TLS: the certificate must verify against the operator's CA, and plain HTTP gets nothing
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/v1/health", timeout=10)            # system CAs: untrusted
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{service.port}/v1/health", timeout=10)


def test_enroll_verify_identify_delete_match_offline_scores(service, client, bundle):
    recognizer = read_server(bundle / "server").recognizer
    faces = synthetic_faces(3, seed=1)
    sent = {}
    for name, face in zip(("alice", "bob", "carol"), faces):
        xp = client.protect(face)
        sent[name] = xp
        r = client._send("POST", f"/v1/subjects/{name}/enroll", xp)
        assert r == {"subject": name, "templates": 1}
    probe = client.protect(faces[0])            # the same face, fresh permutations
    assert not torch.equal(probe, sent["alice"])
    r = client._send("POST", "/v1/subjects/alice/verify", probe)
    want = float(offline_embedding(recognizer, probe) @ offline_embedding(recognizer, sent["alice"]))
    assert abs(r["score"] - want) < 1e-5
    assert r["match"] == (r["score"] >= 0.8) and r["far"] == "1e-3"
    # identify: every enrolled subject, best first, scores as offline
    r = client._send("POST", "/v1/identify", probe, params={"k": 5})
    got = {c["subject"]: c["score"] for c in r["candidates"]}
    assert set(got) == {"alice", "bob", "carol"}
    assert [c["score"] for c in r["candidates"]] == sorted(got.values(), reverse=True)
    for name, xp in sent.items():
        offline = float(offline_embedding(recognizer, probe) @ offline_embedding(recognizer, xp))
        assert abs(got[name] - offline) < 1e-5
    # the client API and delete
    assert client.enroll("bob", faces[1]) == 2
    assert client.verify("bob", faces[1]).subject == "bob"
    assert client.delete("carol") == 1
    with pytest.raises(ServiceError) as e:
        client.verify("carol", faces[2])
    assert e.value.status == 404
    with pytest.raises(ServiceError) as e:
        client.delete("carol")
    assert e.value.status == 404
    assert "carol" not in {v.subject for v in client.identify(faces[2], k=10)}


def test_float16_and_png_payloads(service, bundle):
    recognizer = read_server(bundle / "server").recognizer
    face = synthetic_faces(1, seed=5)[0]
    with RecognitionClient(service.url, bundle / "site", service.token, ca_cert=service.ca,
                           wire="float16") as c16:
        xp = c16.protect(face)
        c16._send("POST", "/v1/subjects/f16/enroll", xp)
        r = c16._send("POST", "/v1/subjects/f16/verify", xp)
        # the service embeds what it received: the float16-rounded X_p
        half = xp.half().float()
        emb = offline_embedding(recognizer, half)
        assert abs(r["score"] - float(emb @ emb)) < 1e-5
    with RecognitionClient(service.url, bundle / "site", service.token, ca_cert=service.ca,
                           wire="png", views=1) as cpng:
        xp = cpng.protect(face)
        r = cpng._send("POST", "/v1/subjects/f16/verify", xp)
        q = torch.from_numpy((xp[0].clamp(0, 1) * 255).round().numpy() / 255.0).float()[None]
        want = float(offline_embedding(recognizer, q) @ offline_embedding(recognizer, half))
        assert abs(r["score"] - want) < 1e-4


def test_client_sends_only_protect_outputs(client):
    face = synthetic_faces(1, seed=9)[0]
    with pytest.raises(NotProtectedError):
        client.body(torch.stack([face, face]).add(1).div(2))       # a raw face in [0, 1]
    xp = client.protect(face)
    with pytest.raises(NotProtectedError):
        client.body(xp + 1e-3)                                      # changed after protect()
    body, kind = client.body(xp)
    assert kind == "application/x-npy" and len(body) > xp.numel() * 4


@pytest.mark.parametrize("case", ["wrong-shape", "three-views", "float64", "int", "object",
                                  "nan", "out-of-range", "truncated", "not-npy", "content-type",
                                  "png-size", "png-gray", "jpeg", "bad-subject", "k"])
def test_rejections(service, case):
    good = np.random.default_rng(0).random(XP, dtype=np.float32)
    path, body, kind, params = "/v1/identify", None, "application/x-npy", {}
    status = 400
    if case == "wrong-shape":
        body = npy_bytes(good[:, :100])
    elif case == "three-views":
        body = npy_bytes(np.stack([good] * 3))
    elif case == "float64":
        body = npy_bytes(good.astype(np.float64))
    elif case == "int":
        body = npy_bytes((good * 255).astype(np.uint8))
    elif case == "object":                   # a pickled object array: never unpickled
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        body = buf.getvalue()
    elif case == "nan":
        bad = good.copy()
        bad[0, 0, 0] = np.nan
        body = npy_bytes(bad)
    elif case == "out-of-range":
        body = npy_bytes(good * 2 - 1)             # a normalised raw face in [-1, 1]
    elif case == "truncated":
        body = npy_bytes(good)[:-100]
    elif case == "not-npy":
        body = b"hello"
    elif case == "content-type":
        body, kind, status = npy_bytes(good), "application/octet-stream", 415
    elif case in ("png-size", "png-gray", "jpeg"):
        size, mode, fmt = ((100, 100), "RGB", "PNG") if case == "png-size" else \
            ((112, 112), "L", "PNG") if case == "png-gray" else ((112, 112), "RGB", "JPEG")
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format=fmt)
        body, kind = buf.getvalue(), "image/png"
    elif case == "bad-subject":
        path, body, status = "/v1/subjects/bad%20subject!/enroll", npy_bytes(good), 422
    elif case == "k":
        body, params, status = npy_bytes(good), {"k": 0}, 422
    with service.http() as h:
        r = h.post(path, content=body, headers={"Content-Type": kind}, params=params)
    assert r.status_code == status, r.text
    assert "error" in r.json() or "detail" in r.json()


def test_oversized_and_unknown_subject(service):
    with service.http() as h:
        r = h.post("/v1/embed", content=b"\0" * (8 * 1024 * 1024 + 1),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 413

        def chunks():                          # no Content-Length: the stream is cut off
            for _ in range(40):
                yield b"\0" * (256 * 1024)
        r = h.post("/v1/embed", content=chunks(), headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 413
        good = np.random.default_rng(1).random(XP, dtype=np.float32)
        r = h.post("/v1/subjects/nobody-here/verify", content=npy_bytes(good),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 404 and "unknown subject" in r.json()["error"]
        r = h.post("/v1/embed", content=npy_bytes(np.stack([good] * 65).astype(np.float16)),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 400 and "1..64" in r.json()["error"]
        r = h.post("/v1/embed", content=npy_bytes(np.stack([good] * 3)),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 3
        as_json = np.array(r.json()["embeddings"], dtype=np.float32)
        r = h.post("/v1/embed", content=npy_bytes(np.stack([good] * 3)),
                   headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        as_npy = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert as_npy.shape == (3, 512) and np.allclose(as_npy, as_json, atol=1e-6)


def test_gallery_never_holds_xp_and_logs_hold_no_payload(service, client):
    face = synthetic_faces(1, seed=11)[0]
    xp = client.protect(face)
    client._send("POST", "/v1/subjects/secret-subject-7/enroll", xp)
    blobs = b"".join(p.read_bytes() for p in service.gallery.parent.glob("gallery.db*"))
    data = xp.numpy().astype(np.float32).tobytes()
    for start in range(0, len(data) - 64, len(data) // 16):       # 16 probes across the X_p
        assert data[start:start + 64] not in blobs
    half = xp.numpy().astype(np.float16).tobytes()
    assert half[1000:1064] not in blobs
    with sqlite3.connect(service.gallery) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(templates)")]
        sizes = {r[0] for r in db.execute("SELECT length(embedding) FROM templates")}
    assert cols == ["id", "subject", "embedding", "created_at"]
    assert sizes == {512 * 4}                 # one float32 embedding per template, nothing more
    log = service.log()
    assert "POST /v1/subjects/{subject}/enroll -> 200 site=site-a" in log
    assert "secret-subject-7" not in log and service.token not in log


def test_gallery_survives_kill_9_mid_enroll(tmp_path, bundle):
    svc = Service(tmp_path, bundle / "server", tmp_path / "g.db").wait()
    acked, errors = [], []
    body = npy_bytes(np.random.default_rng(2).random((2, *XP), dtype=np.float32))

    def enroll_forever(worker: int) -> None:
        with svc.http() as h:
            for i in range(10_000):
                try:
                    r = h.post(f"/v1/subjects/s{worker}-{i}/enroll", content=body,
                               headers={"Content-Type": "application/x-npy"})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.append(f"s{worker}-{i}")
                else:
                    errors.append(r.text)

    threads = [threading.Thread(target=enroll_forever, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.kill9()                                  # mid-stream: requests are in flight
    for t in threads:
        t.join(timeout=60)
    assert len(acked) >= 15 and not errors
    with sqlite3.connect(tmp_path / "g.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in db.execute("SELECT subject FROM templates")}
    assert set(acked) <= stored                  # every acknowledged enroll survived
    assert len(stored) <= len(acked) + 3         # at most the in-flight ones beyond them
    again = Service(tmp_path, bundle / "server", tmp_path / "g.db").wait()
    try:
        with again.http() as h:
            card = h.get("/v1/card").json()
            assert card["gallery"]["templates"] == len(stored)
            r = h.post(f"/v1/subjects/{acked[0]}/verify", content=body,
                       headers={"Content-Type": "application/x-npy"})
            assert r.status_code == 200 and r.json()["score"] > 0.9999
    finally:
        again.stop()


def test_cli_enroll_verify_identify(tmp_path, service, bundle):
    faces = tmp_path / "faces" / "dora"
    faces.mkdir(parents=True)
    for i, face in enumerate(synthetic_faces(2, seed=21)):
        arr = ((face + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(faces / f"dora_{i}.png")
    (tmp_path / "token").write_text(service.token + "\n")
    common = ["--server", service.url, "--bundle", str(bundle / "site"), "--token-file",
              str(tmp_path / "token"), "--ca-cert", str(service.ca), "--quiet"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "minusfed.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    r = run("enroll", str(faces), *common)
    assert r.returncode == 0, r.stderr
    assert "enrolled as dora (2 template(s))" in r.stdout
    assert "smoke preset 'tiny'" in r.stderr                      # the loud warning
    # an untrained f_p need not rank dora first among the module's subjects: she is listed
    r = run("identify", str(faces / "dora_0.png"), "-k", "100", *common)
    assert r.returncode == 0 and "dora_0.png: " in r.stdout and " dora " in r.stdout, r.stderr
    r = run("verify", str(faces / "dora_1.png"), "--subject", "nobody", *common)
    assert r.returncode == 1 and "HTTP 404" in r.stdout
    bad = ["--token-file", str(tmp_path / "wrong")]
    (tmp_path / "wrong").write_text("mfs_wrong")
    r = run("identify", str(faces / "dora_0.png"), *common[:6], *bad, "--ca-cert", str(service.ca))
    assert r.returncode == 1 and "HTTP 401" in r.stdout


def test_two_processes_share_one_gallery_file(tmp_path):
    """Replicas (Ray Serve) each hold a Gallery on the same file: each sees the others' commits
    before answering, appends included, deletes included."""
    from federation.service.gallery import Gallery, UnknownSubject

    path = tmp_path / "g.db"
    a, b = Gallery(path, 4), Gallery(path, 4)
    e = torch.eye(4)
    assert a.enroll("ann", e[0]) == 1
    assert b.verify("ann", e[0]) == pytest.approx(1.0)            # b catches up
    assert b.enroll("bob", e[1]) == 1 and a.enroll("cy", e[2]) == 1
    assert [m.subject for m in a.identify(e[1], 3)][0] == "bob"
    assert [m.subject for m in b.identify(e[2], 3)][0] == "cy"
    assert a.counts() == b.counts() == (3, 3)
    assert b.delete("ann") == 1
    with pytest.raises(UnknownSubject):
        a.verify("ann", e[0])                                       # a reloads after the delete
    assert a.enroll("bob", e[3]) == 2 and b.verify("bob", e[3]) == pytest.approx(1.0)
    b.enroll_many(["dee", "eve"], e[:2])
    assert a.counts() == (4, 5) and b.counts() == (4, 5)
    a.close()
    b.close()
    assert Gallery(path, 4).counts() == (4, 5)
