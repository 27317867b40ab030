"""The model bundle: written by the real writer, read back with every check, converted from a
run's files, shown by `minusfed bundle inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.report import save_server_scores
from federation.service.run_bundle import calibrate, write_run_bundle
from minusface.atomic import write_atomic
from minusface.eval import tar_at_far
from minusface.frontend import MinusFaceFrontend
from minusface.presets import get_preset
from minusface.weights import save_generator
from minusfed.cli import main
from task.bundle import BundleError, read_card, read_server, read_site, smoke_warning, write_bundle
from task.models import initial_arrays
from task.records import STAGE1, STAGE2
from task.wire import unflatten
from tests.service_server import make_bundle


def test_round_trip_gives_the_same_models(tmp_path):
    torch.manual_seed(3)
    from minusface.backbones import build_backbone
    from minusface.generator import UNetGenerator
    g, f = UNetGenerator(width=4).eval(), build_backbone("ir18", 3, width=8).eval()
    out = make_bundle(tmp_path / "b", generator=g, recognizer=f)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "CARD.md", "card.json", "server/card.json", "server/recognizer.safetensors",
        "server/server.json", "site/card.json", "site/generator.safetensors", "site/site.json"]
    site, server = read_site(out), read_server(out / "server")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        rng = torch.Generator().manual_seed(0)
        a = MinusFaceFrontend(generator=g).protect(x, rng=rng, register=False)
        rng = torch.Generator().manual_seed(0)
        b = MinusFaceFrontend(generator=site.generator).protect(x, rng=rng, register=False)
        assert torch.equal(a, b)
        assert torch.equal(f(a), server.recognizer(a))
    assert server.embedding_size == 512 and server.threshold("1e-2") == 0.5
    assert site.smoke and server.smoke and "smoke preset 'tiny'" in smoke_warning(site.info, "x")
    assert read_card(out)["smoke"] is True and read_card(out / "site") == read_card(out)


def test_real_preset_is_not_smoke_and_inf_threshold_reads_back(tmp_path):
    thr = {"1e-2": {"threshold": 0.3}, "1e-3": {"threshold": None, "note": "too few negatives"}}
    out = make_bundle(tmp_path / "b", preset="cpu-small", thresholds=thr)
    server = read_server(out)
    assert not server.smoke and smoke_warning(server.info, "x") is None
    assert server.threshold("1e-3") == float("inf")
    with pytest.raises(BundleError, match="no threshold for FAR '1e-4'"):
        server.threshold("1e-4")


def test_nothing_is_overwritten(tmp_path):
    out = make_bundle(tmp_path / "b")
    before = (out / "site" / "generator.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exist"):
        make_bundle(out, seed=1)
    assert (out / "site" / "generator.safetensors").read_bytes() == before


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "server" / "server.json").unlink(), "server.json: not found"),
    (lambda b: (b / "server" / "recognizer.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}"),
     "recognizer.safetensors: not a readable safetensors"),
    (lambda b: _edit(b / "server" / "server.json", format="something-else"), "'format' is"),
    (lambda b: _edit(b / "server" / "server.json", version=99), "bundle version 99"),
    (lambda b: _edit(b / "server" / "server.json", backbone="resnet9000"), "'backbone' is"),
    (lambda b: _edit(b / "server" / "server.json", **{"backbone-width": 16}), "do not fit"),
    (lambda b: _edit(b / "server" / "server.json", **{"embedding-size": 128}), "embeds to 512"),
    (lambda b: _edit(b / "server" / "server.json", thresholds={"1e-2": {"threshold": "x"}}),
     "'thresholds'"),
    (lambda b: _nan(b / "server" / "recognizer.safetensors"), "NaN or infinite"),
])
def test_damaged_server_half_is_refused_naming_the_file(tmp_path, damage, message):
    out = make_bundle(tmp_path / "b")
    damage(out)
    with pytest.raises(BundleError, match=message):
        read_server(out / "server")


def test_damaged_site_half_is_refused(tmp_path):
    out = make_bundle(tmp_path / "b")
    _edit(out / "site" / "site.json", **{"generator-width": 8})
    with pytest.raises(BundleError, match="width 4"):
        read_site(out / "site")
    _nan(out / "site" / "generator.safetensors")
    with pytest.raises(BundleError, match="NaN"):
        read_site(out / "site")


def _edit(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _nan(path: Path) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path))


def fake_run(run_dir: Path, preset_name: str = "tiny", scores_round: int = 2) -> dict:
    """A run's out-dir as the ServerApp leaves it (final/*.pt, metrics, scores), written with
    the ServerApp's own writers and formats."""
    preset = get_preset(preset_name).with_(backbone_width=8, generator_width=4)
    s1, s2 = initial_arrays(STAGE1, preset, 0), initial_arrays(STAGE2, preset, 1)
    final = run_dir / "final"
    meta = {"preset": preset.name, "stage1-rounds-completed": 1, "stage2-rounds-completed": 1,
            "stage1-rounds-aggregated": 1, "stage2-rounds-aggregated": 1, "commit": "abc"}
    from minusface.weights import build_generator
    save_generator(build_generator(unflatten(s1, "generator")), final / "generator.pt", meta=meta)
    models = {"stage1": s1, "stage2": s2, "preset": preset.name,
              "preset-fields": preset.to_dict(), "meta": meta}
    write_atomic(final / "models.pt", lambda f: torch.save(models, f))
    (run_dir / "run_config.json").write_text(json.dumps({"preset": preset.name, "eval-fold": 0}))
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"round": 2, "stage": STAGE2, "metrics": {"server_accuracy": 0.61, "server_auc": 0.66,
                                                   "server_tar_at_far_1e-2": 0.1}}) + "\n")
    rng = np.random.default_rng(0)
    same = np.arange(600) % 2 == 0
    scores = np.where(same, rng.normal(0.6, 0.15, 600), rng.normal(0.2, 0.15, 600))
    save_server_scores(run_dir, scores_round, STAGE2, scores, same)
    return {"scores": scores, "same": same, "stage2": s2}


def test_from_run_calibrates_thresholds_on_the_runs_scores(tmp_path):
    made = fake_run(tmp_path / "run")
    out = write_run_bundle(tmp_path / "run")
    assert out == tmp_path / "run" / "final"
    server = read_server(out / "server")
    for key, far in (("1e-2", 1e-2), ("1e-3", 1e-3)):
        assert server.threshold(key) == tar_at_far(made["scores"], made["same"], far)["threshold"]
    achieved = (made["scores"][~made["same"]] >= server.threshold("1e-2")).mean()
    assert achieved <= 1e-2
    with torch.no_grad():
        want = read_server(out).recognizer.state_dict()
    for k, v in unflatten(made["stage2"], "recognizer").items():
        assert torch.equal(want[k], v)
    card = read_card(out)
    assert card["server-eval"]["server_accuracy"] == 0.61 and card["commit"] == "abc"
    assert card["calibration"] == {"pairs": 600, "source": "server_scores.json", "eval-fold": 0}
    assert card["smoke"] is True and card["rounds"]["stage1-aggregated"] == 1
    assert calibrate(made["scores"], made["same"])["1e-3"]["max_false_accepts"] == 0


def test_cli_bundle_from_run_and_inspect(tmp_path, capsys):
    fake_run(tmp_path / "run", preset_name="cpu-small")
    assert main(["bundle", "from-run", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 0
    assert "halves: site, server" in capsys.readouterr().out
    assert main(["bundle", "from-run", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["bundle", "inspect", str(tmp_path / "b" / "server")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# minusfed model card\n") and "| server_accuracy | 0.6100 |" in out
    assert main(["bundle", "inspect", str(tmp_path / "nothing")]) == 2
    assert "card.json: not found" in capsys.readouterr().err


def test_protect_accepts_a_site_bundle_and_warns_for_smoke(tmp_path, capsys):
    out = make_bundle(tmp_path / "b")
    faces = tmp_path / "faces"
    faces.mkdir()
    from PIL import Image
    Image.fromarray(np.full((112, 112, 3), 90, np.uint8)).save(faces / "a.png")
    code = main(["protect", str(faces), str(tmp_path / "xp"), "--weights", str(out / "site"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "xp" / "a.png").is_file()
    assert "smoke preset 'tiny'" in err and "WARNING" in err


def test_write_bundle_refuses_weights_that_do_not_fit(tmp_path):
    from minusface.backbones import build_backbone
    from minusface.generator import UNetGenerator
    f = build_backbone("ir18", 3, width=16)
    with pytest.raises(BundleError, match="do not fit"):
        write_bundle(tmp_path / "b", UNetGenerator(width=4), f.state_dict(),
                     {"backbone": "ir18", "backbone-width": 8,
                      "thresholds": {"1e-2": {"threshold": 0.1}, "1e-3": {"threshold": 0.2}}},
                     {"preset": "tiny"})
    assert not (tmp_path / "b").exists()          # checked before the first file
