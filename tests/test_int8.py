"""int8 f_p for the service: the quantized model from stored ranges, the bundle's measurement
on real LFW X_p, the gate on serving it, and the service answering with it over HTTPS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.data import FaceDataset, load_image
from clients.recognition_client import RecognitionClient, face_files
from federation.service.gallery import Gallery, GalleryError
from federation.service.int8_bundle import INT8_FILE, INT8_JSON, quantize_bundle, read_int8
from federation.service.model import served_model
from minusface import int8
from minusface.backbones import build_backbone
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from task.bundle import BundleError, read_server
from tests.service_server import Service, make_bundle

pytestmark = pytest.mark.skipif(not int8.available(), reason="no x86 quantized engine")


def _trained_like(width: int = 8, seed: int = 0) -> nn.Module:
    """An IR-18 with non-trivial BatchNorm statistics (fresh weights have mean 0 / var 1)."""
    torch.manual_seed(seed)
    model = build_backbone("ir18", 3, width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def lfw_xp(lfw_root: Path) -> torch.Tensor:
    """X_p of 48 real LFW faces through a width-4 g (fresh CSPRNG permutations)."""
    files = face_files([lfw_root / "images"])[:48]
    faces = torch.cat(list(FaceDataset([(f, 0) for f in files], progress=False).batches(48)))
    torch.manual_seed(1)
    frontend = MinusFaceFrontend(generator=UNetGenerator(width=4)).eval()
    with torch.no_grad():
        return frontend.protect(faces, register=False)


def test_the_quantizable_copy_computes_the_same_embedding(lfw_xp):
    model = _trained_like()
    copy = int8.quantizable_copy(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in copy.modules())     # folded
    assert not any(type(m) is nn.PReLU for m in copy.modules())               # kept float
    with torch.no_grad():
        assert torch.allclose(copy(lfw_xp), model(lfw_xp), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())        # original untouched


def test_int8_from_stored_ranges_is_the_calibrated_model_and_close_to_float(lfw_xp):
    model = _trained_like()
    observers = int8.calibrate(model, [lfw_xp[:24], lfw_xp[24:]])
    assert observers and all(int8.OBSERVER_TAG in k for k in observers)
    q1, q2 = int8.build(model, observers), int8.build(model, dict(observers))
    kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in q1.modules()}
    assert "torch.ao.nn.quantized.modules.conv.Conv2d" in kinds
    assert "torch.ao.nn.quantized.modules.linear.Linear" in kinds
    assert not any("PReLU" in k for k in kinds)               # no quantized PReLU module ...
    prelus = [n for n in q1.graph.nodes if "prelu" in str(n.target)]
    assert prelus and all(n.args[0].target == "dequantize" for n in prelus)   # ... float PReLU
    with torch.no_grad():
        a, b, ref = q1(lfw_xp), q2(lfw_xp), model(lfw_xp)
    assert torch.equal(a, b)                              # rebuilt from the ranges: the same model
    cos = F.cosine_similarity(a, ref)
    assert float(cos.min()) > 0.98, cos.min()


def test_torchs_quantized_prelu_is_why_prelu_stays_float(lfw_xp):
    """Pins the workaround: if torch's quantized PReLU becomes accurate, this fails and the
    swap in minusface/int8.py can go."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.PReLU(16)).eval()
    with pytest.warns(Warning):
        prepared = prepare_fx(block, get_default_qconfig_mapping(int8.ENGINE), (lfw_xp[:1],))
    prepared(lfw_xp)
    with torch.no_grad(), pytest.warns(Warning):
        naive = convert_fx(prepared)(lfw_xp)
    ours = int8.build(block, int8.calibrate(block, [lfw_xp]))
    with torch.no_grad():
        ref, mine = block(lfw_xp), ours(lfw_xp)
    cos = lambda x: float(F.cosine_similarity(x.flatten(1), ref.flatten(1)).min())  # noqa: E731
    assert cos(mine) > 0.999 and cos(naive) < 0.98, (cos(mine), cos(naive))


def test_build_refuses_ranges_of_another_model_or_never_calibrated(lfw_xp):
    observers = int8.calibrate(_trained_like(8), [lfw_xp[:8]])
    wider = build_backbone("ir50", 3, width=8).eval()
    with pytest.raises(int8.Int8Error, match="does not fit this f_p: missing"):
        int8.build(wider, observers)
    empty = {k: (torch.tensor(float("inf")) if k.endswith("min_val") else v)
             for k, v in observers.items()}
    with pytest.raises(int8.Int8Error, match="saw no data"):
        int8.build(_trained_like(8), empty)
    with pytest.raises(int8.Int8Error, match="no calibration images"):
        int8.calibrate(_trained_like(8), [])


@pytest.fixture(scope="module")
def bundle_int8(tmp_path_factory, lfw_root) -> Path:
    final = make_bundle(tmp_path_factory.mktemp("int8") / "final",
                        recognizer=_trained_like(8, seed=3))
    info = json.loads((final / "server" / "server.json").read_text())
    info["calibration"] = {"eval-fold": 0, "pairs": 40}
    (final / "server" / "server.json").write_text(json.dumps(info))
    quantize_bundle(final, lfw_root, max_pairs=40, calibration_faces=16)
    return final


def test_the_bundle_records_a_measurement_on_held_out_lfw_pairs(bundle_int8):
    info = json.loads((bundle_int8 / "server" / INT8_JSON).read_text())
    ev = info["evaluation"]
    assert ev["pairs"] == 40 and ev["eval-fold"] == 0 and info["calibration"]["faces"] == 16
    assert info["calibration"]["folds"] == "all but 0"
    assert ev["accuracy-drop-points"] == pytest.approx(
        100 * (ev["float32"]["accuracy"] - ev["int8"]["accuracy"]))
    assert info["accepted"] == (ev["accuracy-drop-points"] <= 0.2)
    assert 0.98 < ev["embedding-cosine"]["min"] <= ev["embedding-cosine"]["median"] <= 1.0
    assert set(info["thresholds"]) == {"1e-2", "1e-3"}
    assert info["timing"]["batch-32"]["int8-ms-per-image"] > 0
    with pytest.raises(BundleError, match="exists; pass --overwrite"):
        quantize_bundle(bundle_int8, "/nonexistent", max_pairs=40)


def _set_accepted(bundle: Path, accepted: bool) -> None:
    path = bundle / "server" / INT8_JSON
    info = json.loads(path.read_text())
    info["accepted"] = accepted
    path.write_text(json.dumps(info))


def test_serving_int8_needs_an_accepted_measurement(bundle_int8, tmp_path):
    _set_accepted(bundle_int8, True)
    served = served_model(bundle_int8 / "server", "int8")
    assert served.precision == "int8" and served.tag.endswith(":int8")
    assert served.tag.split(":")[0] == served_model(bundle_int8 / "server").tag.split(":")[0]
    _set_accepted(bundle_int8, False)
    try:
        with pytest.raises(BundleError, match="not accepted: int8 lost"):
            read_int8(read_server(bundle_int8 / "server"))
    finally:
        _set_accepted(bundle_int8, True)
    bare = make_bundle(tmp_path / "bare")
    with pytest.raises(BundleError, match="minusfed bundle int8"):
        served_model(bare / "server", "int8")
    (bundle_int8 / "server" / INT8_FILE).rename(tmp_path / "moved")
    try:
        with pytest.raises(BundleError, match="recognizer-int8.safetensors: not found"):
            served_model(bundle_int8 / "server", "int8")
    finally:
        (tmp_path / "moved").rename(bundle_int8 / "server" / INT8_FILE)


def test_a_gallery_belongs_to_one_model_and_precision(tmp_path):
    path = tmp_path / "g.db"
    Gallery(path, 4, "abc:float").close()
    Gallery(path, 4, "abc:float").close()
    Gallery(path, 4).close()                                   # unchecked (tools, benches)
    with pytest.raises(GalleryError, match="enrolled with model abc:float.*runs abc:int8"):
        Gallery(path, 4, "abc:int8")


def test_the_service_answers_with_the_int8_f_p(bundle_int8, lfw_root, tmp_path):
    _set_accepted(bundle_int8, True)
    svc = Service(tmp_path, bundle_int8 / "server", tmp_path / "gallery.db",
                  extra=["--int8"]).wait()
    try:
        with svc.http() as h:
            card = h.get("/v1/card").json()
        expected = read_int8(read_server(bundle_int8 / "server"))
        assert card["precision"] == "int8"
        assert card["threshold"] == expected.info["thresholds"]["1e-3"]["threshold"]
        faces = [load_image(f) for f in face_files([lfw_root / "images" / "Aaron_Peirsol"])[:2]]
        with RecognitionClient(svc.url, bundle_int8 / "site", svc.token, ca_cert=svc.ca,
                               wire="float32") as client:
            enrolled, probe = client.protect(faces[0]), client.protect(faces[1])
            client._send("POST", "/v1/subjects/aaron/enroll", enrolled)
            score = client._send("POST", "/v1/subjects/aaron/verify", probe)["score"]
        with torch.no_grad():
            want = float(F.normalize(expected.model(probe).sum(0), dim=0)
                         @ F.normalize(expected.model(enrolled).sum(0), dim=0))
            as_float = float(F.normalize(read_server(bundle_int8 / "server").recognizer(probe)
                                         .sum(0), dim=0)
                             @ F.normalize(read_server(bundle_int8 / "server").recognizer(enrolled)
                                           .sum(0), dim=0))
        assert score == pytest.approx(want, abs=1e-5)
        assert score != pytest.approx(as_float, abs=1e-6)        # it is not the float f_p
    finally:
        svc.stop()
    svc = Service(tmp_path, bundle_int8 / "server", tmp_path / "gallery.db")     # float32 now
    assert svc.proc.wait(timeout=120) == 2
    assert "enrolled with model" in svc.log() and ":int8" in svc.log()


@pytest.mark.parametrize("mode, dtype", [("bf16", torch.bfloat16), ("float32", torch.float32)])
def test_the_service_float_path_runs_under_the_cpu_precision_policy(monkeypatch, tmp_path, mode,
                                                                    dtype):
    from federation.service.model import Embedder
    from minusface import precision

    monkeypatch.setenv(precision.ENV, mode)
    served = served_model(make_bundle(tmp_path / "b") / "server")
    seen: list[torch.dtype] = []
    first_conv = next(m for m in served.model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    emb = Embedder(served)(torch.rand(3, 2, 3, 112, 112))
    assert seen == [dtype] and emb.dtype == torch.float32 and emb.shape == (3, 512)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
