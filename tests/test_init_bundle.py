"""A run started from a trained bundle (run config `init-bundle`): no stage 1, the bundle's g
frozen, stage 2 fine-tunes the bundle's f_p; a bundle that does not fit is refused before
anything is written.  Real ServerApp + ClientApp in one process (`simulation.inprocess`), tiny
preset, LFW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from federation.init_bundle import RECORD, load_init_bundle, run_config_for
from minusface.presets import PRESETS
from task.bundle import BundleError, read_card, read_server, read_site
from task.config import run_config
from task.models import initial_arrays
from task.records import STAGE2
from task.wire import flatten
from tests.service_server import make_bundle


def tiny(lfw_root: Path, out: Path, **over: object) -> dict:
    cfg = {"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
           "data-path": str(lfw_root), "out-dir": str(out), "min-nodes": 2,
           "max-identities": 6, "server-eval-pairs": 20}
    cfg.update(over)
    return cfg


def run(cfg: dict) -> None:
    from simulation.inprocess import run_inprocess
    run_inprocess(cfg, 2)


@pytest.fixture(scope="module")
def trained(lfw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run's bundle (its final/)."""
    out = tmp_path_factory.mktemp("first") / "run"
    run(tiny(lfw_root, out))
    return out / "final"


@pytest.fixture(scope="module")
def continued(trained: Path, lfw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run started from that bundle (stage1-rounds left at 1: not used)."""
    out = tmp_path_factory.mktemp("second") / "run"
    run(tiny(lfw_root, out, **{"init-bundle": str(trained), "seed": 7}))
    return out


def test_the_config_key_wants_an_absolute_path_and_stage2_rounds() -> None:
    with pytest.raises(ValueError, match="'init-bundle': expected .* absolute path"):
        run_config({"init-bundle": "models/x"})
    with pytest.raises(ValueError, match="'stage2-rounds': expected >= 1 with init-bundle"):
        run_config({"init-bundle": "/abs/bundle", "stage2-rounds": 0})
    assert run_config({"init-bundle": "/abs/bundle"}).init_bundle == "/abs/bundle"


def test_a_bundle_that_does_not_fit_the_preset_names_the_keys_that_would(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", preset="tiny", backbone_width=12)   # g w=4 as tiny
    assert run_config_for(bundle) == {"preset": "tiny"}        # card's preset-fields absent
    with pytest.raises(BundleError, match=r"backbone-width 12 \(the run's preset 'tiny' gives 8\)"):
        load_init_bundle(bundle, PRESETS["tiny"])
    with pytest.raises(BundleError, match="is not a folder"):
        load_init_bundle(tmp_path / "missing", PRESETS["tiny"])
    fitting = make_bundle(tmp_path / "ok", preset="tiny", backbone_width=8)
    init = load_init_bundle(fitting, PRESETS["tiny"])
    assert set(initial_arrays(STAGE2, PRESETS["tiny"], 0)) == set(init.recognizer)
    assert all(k.startswith("generator.") for k in init.generator)
    assert init.stage1_aggregated == 1 and init.summary["preset"] == "tiny"


def test_run_config_for_gives_the_overrides_a_card_records(trained: Path, tmp_path: Path) -> None:
    card = read_card(trained)
    card["preset-fields"]["backbone_width"] = 24
    moved = tmp_path / "card"
    moved.mkdir()
    (moved / "card.json").write_text(json.dumps(card))
    assert run_config_for(trained) == {"preset": "tiny"}
    assert run_config_for(moved) == {"preset": "tiny", "backbone-width": 24}


def test_a_run_from_a_bundle_skips_stage1_keeps_g_and_fine_tunes_f_p(trained: Path,
                                                                      continued: Path) -> None:
    records = [json.loads(line) for line in (continued / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records if "stage" in r}
    assert stages == {STAGE2}                            # no stage-1 round ran
    start = json.loads((continued / RECORD).read_text())
    assert start["path"] == str(trained.resolve()) and start["preset"] == "tiny"
    assert 0.0 <= start["server-eval-as-loaded"]["server_accuracy"] <= 1.0
    # g is the bundle's, bit for bit
    before, after = read_site(trained).generator, read_site(continued / "final").generator
    for k, v in before.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), k
    # f_p moved, and from the bundle's f_p, not from a fresh one
    start_fp = flatten({"recognizer": read_server(trained).recognizer})
    end_fp = flatten({"recognizer": read_server(continued / "final").recognizer})
    fresh = initial_arrays(STAGE2, PRESETS["tiny"], 7 + 1)
    weights = [k for k in start_fp if start_fp[k].is_floating_point() and start_fp[k].dim() > 1]

    def dist(a: dict, b: dict) -> float:
        return float(sum((a[k] - b[k]).pow(2).sum() for k in weights))
    assert dist(end_fp, start_fp) > 0
    assert dist(end_fp, start_fp) < dist(end_fp, fresh) / 10
    # provenance: g's training is the bundle's, recorded in final/ and the card
    card = read_card(continued / "final")
    assert card["rounds"]["stage1-aggregated"] == read_card(trained)["rounds"]["stage1-aggregated"]
    assert card["rounds"]["stage1-planned"] == 0
    meta = torch.load(continued / "final" / "models.pt", weights_only=True)["meta"]
    assert meta["init-bundle"]["path"] == str(trained.resolve())
    assert "## Started from a trained bundle" in (continued / "report.md").read_text()


def test_a_bundle_of_another_architecture_stops_the_run_before_anything_is_written(
        trained: Path, lfw_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(BundleError, match=r"generator-width 4 \(the run's preset 'tiny' gives 6\)"):
        run(tiny(lfw_root, out, **{"init-bundle": str(trained), "generator-width": 6}))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_pooled_stage2_from_a_bundle_trains_from_its_f_p(trained: Path, lfw_root: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny(lfw_root, out, **{"init-bundle": str(trained), "stage2-mode": "pooled",
                               "pooled-workers": 1, "protect-copies": 1, "seed": 7}))
    job = json.loads((out / "pooled" / "job.json").read_text())
    assert job["init_recognizer"].endswith("init_recognizer.safetensors")
    start_fp = flatten({"recognizer": read_server(trained).recognizer})
    end_fp = flatten({"recognizer": read_server(out / "final").recognizer})
    fresh = initial_arrays(STAGE2, PRESETS["tiny"], 7 + 1)
    weights = [k for k in start_fp if start_fp[k].is_floating_point() and start_fp[k].dim() > 1]

    def dist(a: dict, b: dict) -> float:
        return float(sum((a[k] - b[k]).pow(2).sum() for k in weights))
    assert 0 < dist(end_fp, start_fp) < dist(end_fp, fresh) / 10
    for k, v in read_site(trained).generator.state_dict().items():
        assert torch.equal(v, read_site(out / "final").generator.state_dict()[k]), k
