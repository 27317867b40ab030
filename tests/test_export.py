"""`minusfed export`: ONNX graphs of a bundle match PyTorch on real LFW faces under onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minusface.backbones import build_backbone
from minusface.frontend import MinusFaceFrontend
from minusface.generator import UNetGenerator
from minusfed.cli import main
from task.bundle import read_server, read_site
from task.export import COSINE_MIN, XP_TOL, ExportError, OnnxSiteRuntime, export_bundle
from tests.service_server import make_bundle

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(5)
    g = UNetGenerator(width=8)
    with torch.no_grad():                 # a g whose output is not negligible next to e(X)
        for p in g.parameters():
            p.mul_(3.0)
    return make_bundle(tmp_path_factory.mktemp("b") / "final", generator=g,
                       recognizer=build_backbone("ir18", 3, width=8))


@pytest.fixture(scope="module")
def lfw_faces_dir(lfw_root, tmp_path_factory):
    """Six faces of six different people (a folder the CLI can read)."""
    people = sorted(p for p in (lfw_root / "images").iterdir() if p.is_dir())[:6]
    out = tmp_path_factory.mktemp("faces")
    for person in people:
        first = sorted(person.iterdir())[0]
        (out / first.name).write_bytes(first.read_bytes())
    return out


def test_cli_exports_and_the_graphs_reproduce_pytorch_on_lfw(bundle, lfw_faces_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(bundle), str(out), "--faces", str(lfw_faces_dir)]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == {"site/residue.onnx", "site/decode.onnx",
                                      "server/recognizer.onnx"}
    check = manifest["check"]
    assert check["faces"] == 6 and "6 face(s) from" in check["faces_source"]
    assert check["protect_max_abs_diff"] <= XP_TOL and check["embedding_min_cosine"] >= COSINE_MIN
    assert "checked against PyTorch" in capsys.readouterr().out

    # The exported site runtime, used as a site would: fresh CSPRNG permutations, X_p in [0, 1]
    # that f_p (ONNX) embeds like PyTorch's f_p embeds PyTorch's X_p for the same permutations.
    from clients.data import FaceDataset
    faces = torch.cat(list(FaceDataset([(p, 0) for p in sorted(lfw_faces_dir.iterdir())],
                                       skip_errors=False, progress=False).batches(8)))
    runtime = OnnxSiteRuntime.load(out / "site")
    xp = runtime.protect(faces.numpy())
    assert xp.shape == (6, 3, 112, 112) and xp.min() >= 0.0 and xp.max() <= 1.0
    xp_again = runtime.protect(faces.numpy())
    assert not np.allclose(xp, xp_again)                      # a fresh theta every call

    site = read_site(bundle)
    perm = np.stack([np.random.default_rng(i).permutation(192) for i in range(6)])
    with torch.no_grad():
        r = MinusFaceFrontend(generator=site.generator).residue(faces)
        from minusface.dct import decode
        expected = decode(torch.from_numpy(np.take_along_axis(r.numpy(), perm[:, :, None, None], 1)))
    got = runtime.protect(faces.numpy(), perm)
    assert np.max(np.abs(got - expected.numpy())) <= XP_TOL
    assert (out / "site" / "residue.onnx").stat().st_size > 0


def test_only_the_half_given_is_exported_and_nothing_is_overwritten(bundle, tmp_path):
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    out = tmp_path / "srv"
    manifest = export_bundle(out, None, read_server(bundle), faces, "noise")
    assert list(manifest["files"]) == ["server/recognizer.onnx"]
    before = (out / "server" / "recognizer.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="already exist"):
        export_bundle(out, None, read_server(bundle), faces, "noise")
    assert (out / "server" / "recognizer.onnx").read_bytes() == before
    with pytest.raises(ExportError, match="nothing to export"):
        export_bundle(tmp_path / "none", None, None, faces, "noise")


def test_a_graph_that_differs_from_pytorch_is_refused_and_nothing_written(bundle, tmp_path,
                                                                          monkeypatch):
    import task.export as export

    real = export.check_export

    def drifted(*args, **kwargs):
        check = real(*args, **kwargs)
        return {**check, "embedding_min_cosine": 0.5}

    monkeypatch.setattr(export, "check_export", drifted)
    with pytest.raises(ExportError, match="do not reproduce PyTorch.*cosine 0.500000"):
        export_bundle(tmp_path / "x", None, read_server(bundle), torch.zeros(1, 3, 112, 112), "z")
    assert not (tmp_path / "x").exists()


def test_cli_names_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "neither a bundle nor one of its halves" in capsys.readouterr().err
