"""A run's outputs survive crashes, resumes and mistakes (server side).

metrics.jsonl with a torn or bad line, a resume with another preset or plan, a corrupt
checkpoint.pt and its documented recovery, a fresh run into a used out-dir, and the provenance
("meta") that final/ carries.  The runs are the real ServerApp + ClientApp in one process
(`simulation.inprocess`) with the tiny preset; one finished run is shared and copied per test.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.report import write_report
from minusface.weights import WeightsError, generator_metadata, load_generator, save_generator
from strategy.checkpoint import CheckpointError, CheckpointStore
from task.records import STAGE1, STAGE2
from task.wire import select

TORN = b'{"metrics": {"server_accuracy": 0.5}, "round": 3, "sta'


def tiny_config(lfw_root: Path, out_dir: Path, **over: object) -> dict:
    cfg = {"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
           "fraction-train": 1.0, "data-path": str(lfw_root), "out-dir": str(out_dir),
           "min-nodes": 2, "max-identities": 6, "server-eval-pairs": 10}
    cfg.update(over)
    return cfg


def run(cfg: dict) -> None:
    from simulation.inprocess import run_inprocess
    run_inprocess(cfg, 2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture(scope="module")
def finished(lfw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: round 1 (stage 1), round 2 (stage 2), final/, report.md."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_config(lfw_root, out))
    return out


@pytest.fixture
def used(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run's out-dir."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --- metrics.jsonl -------------------------------------------------------------


def test_torn_last_line_is_skipped_then_moved_to_torn_file_before_the_next_append(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path)
    store.append_metrics({"round": 1, "stage": STAGE1, "metrics": {}})
    store.append_metrics({"round": 2, "stage": STAGE1, "metrics": {}})
    with open(store.metrics_path, "ab") as file:      # a crash mid-append
        file.write(TORN)
    caplog.set_level(logging.WARNING)
    assert [r["round"] for r in store.read_metrics()] == [1, 2]
    assert f"{store.metrics_path} line 3: unfinished last line" in warnings_of(caplog)

    store.append_metrics({"round": 3, "stage": STAGE1, "metrics": {}})
    lines = store.metrics_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["round"] for x in lines[:-1]] == [1, 2, 3]
    torn = tmp_path / "metrics.jsonl.torn"
    assert torn.read_bytes() == TORN + b"\n"            # kept, not deleted
    assert "line 3 was cut short" in warnings_of(caplog) and str(torn) in warnings_of(caplog)


def test_a_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.metrics_path.write_bytes(b'{"round": 1, "stage": "stage1", "metrics": {}}')
    store.append_metrics({"round": 2, "stage": STAGE1, "metrics": {}})
    assert [r["round"] for r in store.read_metrics()] == [1, 2]
    assert not (tmp_path / "metrics.jsonl.torn").exists()


def test_report_skips_bad_lines_naming_them_and_tolerates_a_torn_tail(
        used: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = used / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    bad = [b"not json at all", b"[1, 2]", b'{"round": "two", "stage": 1}', b"\xff\xfe{"]
    lines[1:1] = bad                                   # lines 2-5 of the file
    path.write_bytes(b"\n".join(lines) + b"\n" + TORN)
    caplog.set_level(logging.WARNING)
    report = write_report(used).read_text(encoding="utf-8")
    assert "| 1 | stage1 |" in report and "| 2 | stage2 |" in report
    said = warnings_of(caplog)
    for number in (2, 3, 4, 5):
        assert f"{path} line {number}:" in said
    assert f"{path} line {len(lines) + 1}: unfinished last line" in said
    assert "| 3 |" not in report


def test_report_shows_the_last_try_of_a_round_trained_again(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    metrics = {"server_accuracy": 0.5, "server_accuracy_std": 0.1}
    for round_, acc in ((1, 0.5), (2, 0.6), (2, 0.7)):   # round 2 redone after a resume
        store.append_metrics({"round": round_, "stage": STAGE1,
                              "metrics": dict(metrics, server_accuracy=acc)})
        store.append_metrics({"round": round_, "stage": STAGE1,
                              "client": {"node_id": 100 + round_, "accepted": True,
                                         "metrics": {"loss": acc}}})
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "| 2 | stage1 | - | 70.00 ± 10.00 | - | - | - | - s |" in text
    assert "60.00" not in text and text.count("| 2 | stage1 | 102 |") == 1


# --- resume -------------------------------------------------------------------


def test_resume_with_another_preset_fails_at_the_start_and_changes_nothing(
        used: Path, lfw_root: Path) -> None:
    before = snapshot(used)
    with pytest.raises(CheckpointError) as info:
        run(tiny_config(lfw_root, used, preset="cpu-small"))
    msg = str(info.value)
    assert str(used) in msg and "'tiny'" in msg and "'cpu-small'" in msg
    assert "new out-dir" in msg and "run config it was made with" in msg
    assert snapshot(used) == before


def test_resume_of_a_checkpoint_without_recorded_preset_checks_shapes(
        used: Path, lfw_root: Path) -> None:
    """Checkpoints written before the preset was recorded: the array shapes still tell."""
    ck = torch.load(used / "checkpoint.pt", weights_only=True)
    assert ck["extra"]["made-with"]["preset"] == "tiny"
    ck["extra"] = {}
    torch.save(ck, used / "checkpoint.pt")
    before = snapshot(used)
    with pytest.raises(CheckpointError, match=r"do not fit preset 'cpu-small'.*shape differs"):
        run(tiny_config(lfw_root, used, preset="cpu-small"))
    assert snapshot(used) == before


@pytest.mark.parametrize("over, expected", [
    ({"stage1-rounds": 2}, "its round 2 is stage2, but with stage1-rounds=2 round 2 is stage1"),
    ({"stage2-rounds": 0}, "after round 2, but the run config plans 1 round"),
])
def test_resume_whose_plan_moves_the_checkpoint_fails(used: Path, lfw_root: Path,
                                                      over: dict, expected: str) -> None:
    before = snapshot(used)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        run(tiny_config(lfw_root, used, **over))
    assert snapshot(used) == before


def test_stage2_checkpoint_keeps_stage1_rounds(tmp_path: Path, lfw_root: Path) -> None:
    """g is frozen once stage 2 began: more stage-1 rounds cannot be honoured."""
    from federation.server_app import check_resume, initial_arrays, made_with
    from minusface.presets import get_preset
    from task.config import run_config
    preset = get_preset("tiny")
    old = made_with(run_config(tiny_config(lfw_root, tmp_path)), preset)
    cfg = run_config(tiny_config(lfw_root, tmp_path, **{"stage1-rounds": 2, "stage2-rounds": 2}))
    s1 = initial_arrays(STAGE1, preset, 0)
    arrays = {**initial_arrays(STAGE2, preset, 1), **select(s1, "generator")}
    ck = {"round": 3, "stage": STAGE2, "arrays": arrays, "extra": {"made-with": old}}
    plan = [(STAGE1, 1), (STAGE1, 2), (STAGE2, 1), (STAGE2, 2)]
    with pytest.raises(CheckpointError, match="stage1-rounds must stay 1"):
        check_resume(ck, tmp_path, made_with(cfg, preset), plan, preset, s1)


def test_a_resume_starts_from_the_checkpoint_weights(used: Path, lfw_root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart after round 1 (its checkpoint is the newest: checkpoint.pt was lost between
    the two renames of a save) sends round 2's sites the checkpoint's aggregated g, not a fresh
    one, and logs round 2 again.  (tests/test_federation.py checks the stage-2 resume.)"""
    from minusface.presets import get_preset
    from task.models import initial_arrays
    from task.records import FROZEN_GENERATOR
    from tests.run_outcome import assert_honest_replies_accepted, capture_train_messages
    (used / "checkpoint.pt").unlink()
    ck = torch.load(used / "checkpoint.prev.pt", weights_only=True)
    assert (ck["round"], ck["stage"]) == (1, STAGE1)
    g = {k: v for k, v in ck["arrays"].items() if k.startswith("generator.")}
    fresh = initial_arrays(STAGE1, get_preset("tiny"), 0)
    assert g and any(not torch.equal(v, fresh[k]) for k, v in g.items())   # g was trained

    messages = capture_train_messages(monkeypatch)
    run(tiny_config(lfw_root, used))
    assert len(messages) == 2 and all(FROZEN_GENERATOR in m for m in messages)
    for m in messages:                                 # round 2 (stage 2) at both sites
        sent = m[FROZEN_GENERATOR]
        assert set(sent) == set(g) and all(torch.equal(sent[k], g[k]) for k in g)
    rounds = [r["round"] for r in CheckpointStore(used).read_metrics() if "client" not in r]
    assert rounds == [1, 2, 2]
    assert_honest_replies_accepted(used, every=True)


def test_stage2_checkpoint_keeps_g_under_its_wire_keys_and_an_older_one_resumes(
        used: Path, lfw_root: Path) -> None:
    """The frozen g is checkpointed as "generator.*", the keys it has on the wire; a stage-2
    checkpoint written before that scheme ("frozen.generator.*") still resumes, g unchanged."""
    ck = torch.load(used / "checkpoint.pt", weights_only=True)
    g = select(ck["arrays"], "generator")
    assert ck["stage"] == STAGE2 and g and not any(k.startswith("frozen.") for k in ck["arrays"])
    ck["arrays"] = {("frozen." + k if k in g else k): v for k, v in ck["arrays"].items()}
    torch.save(ck, used / "checkpoint.pt")
    run(tiny_config(lfw_root, used, **{"stage2-rounds": 2}))
    after = torch.load(used / "checkpoint.pt", weights_only=True)
    assert (after["round"], after["stage"]) == (3, STAGE2)
    assert select(after["arrays"], "generator").keys() == g.keys()
    assert all(torch.equal(after["arrays"][k], v) for k, v in g.items())     # g stayed frozen


def test_corrupt_checkpoint_names_a_recovery_that_works(used: Path, lfw_root: Path) -> None:
    (used / "checkpoint.pt").write_bytes(b"PK\x03\x04 a checkpoint cut short")
    before = snapshot(used)
    cfg = tiny_config(lfw_root, used)
    with pytest.raises(CheckpointError) as info:
        run(cfg)
    msg = str(info.value)
    assert "nothing was changed" in msg and "round 1" in msg and str(used / "checkpoint.pt") in msg
    assert snapshot(used) == before
    command = re.search(r"`(mv [^`]+)`", msg).group(1)
    subprocess.run(command, shell=True, check=True)    # exactly what the message tells
    aside = list(used.glob("checkpoint.corrupt-*.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == before["checkpoint.pt"]

    run(cfg)                                           # resumes after round 1, redoes round 2
    ck = torch.load(used / "checkpoint.pt", weights_only=True)
    assert (ck["round"], ck["stage"]) == (2, STAGE2)
    rounds = [r["round"] for r in CheckpointStore(used).read_metrics() if "client" not in r]
    assert rounds == [1, 2, 2]                         # both tries stay in the log
    report = (used / "report.md").read_text(encoding="utf-8")
    round_table = report[report.index("## Rounds"):report.index("## Sites")]
    assert round_table.count("| 2 | stage2 |") == 1    # the report shows the last try


def test_corrupt_checkpoint_without_previous_says_use_a_new_out_dir(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, STAGE1, {"w": np.zeros(2, np.float32)})
    store.checkpoint_path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no earlier checkpoint is usable.*new out-dir"):
        store.latest()


def test_fresh_run_refuses_an_out_dir_with_an_earlier_runs_outputs(
        used: Path, lfw_root: Path) -> None:
    (used / "checkpoint.pt").unlink()
    (used / "checkpoint.prev.pt").unlink()
    before = snapshot(used)
    with pytest.raises(FileExistsError) as info:
        run(tiny_config(lfw_root, used))
    msg = str(info.value)
    assert str(used) in msg and "final/generator.pt" in msg and "metrics.jsonl" in msg
    assert snapshot(used) == before


# --- final/ ---------------------------------------------------------------------


def test_final_outputs_record_how_they_were_made(finished: Path) -> None:
    meta = generator_metadata(finished / "final" / "generator.pt")
    assert meta["preset"] == "tiny" and meta["seed"] == 0
    assert (meta["stage1-rounds-planned"], meta["stage1-rounds-completed"],
            meta["stage1-rounds-aggregated"]) == (1, 1, 1)
    assert (meta["stage2-rounds-completed"], meta["stage2-rounds-aggregated"]) == (1, 1)
    assert meta["run-dir"] == str(finished)
    assert meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
    models = torch.load(finished / "final" / "models.pt", weights_only=True)
    assert models["meta"] == meta and models["preset"] == "tiny"
    assert load_generator(finished / "final" / "generator.pt").width == 4
    assert not list(finished.rglob("*.tmp"))


def test_a_run_whose_every_update_is_refused_marks_g_untrained(
        lfw_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Context, RecordDict

    from clients.client_app import app as client_app
    from federation.server_app import run_server
    from simulation.inprocess import InProcessGrid
    out = tmp_path / "run"
    cfg = tiny_config(lfw_root, out, **{"stage2-rounds": 0, "round-timeout": 5.0})
    grid = InProcessGrid(client_app, 2, cfg)
    grid.failing = set(grid.node_ids)                  # no site replies: nothing to aggregate
    caplog.set_level(logging.WARNING)
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(cfg)))
    meta = generator_metadata(out / "final" / "generator.pt")
    assert (meta["stage1-rounds-completed"], meta["stage1-rounds-aggregated"]) == (1, 0)
    assert "UNTRAINED generator" in warnings_of(caplog)


def test_generator_meta_round_trips_and_rejects_what_the_safe_loader_cannot(
        tmp_path: Path) -> None:
    from minusface.generator import UNetGenerator
    g = UNetGenerator(width=4)
    path = tmp_path / "g.pt"
    torch.save({"generator": g.state_dict(), "width": 4}, path)   # written before meta existed
    assert generator_metadata(path) == {}
    save_generator(g, path, meta={"preset": "tiny", "rounds": [1, 2], "commit": None})
    assert generator_metadata(path) == {"preset": "tiny", "rounds": [1, 2], "commit": None}
    with pytest.raises(TypeError, match=r"meta\['when'\]: \w*Path is not a plain type"):
        save_generator(g, path, meta={"when": Path("/x")})
    assert generator_metadata(path)["preset"] == "tiny"   # the failed save changed nothing
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="list.pt: expected a dict"):
        generator_metadata(tmp_path / "list.pt")
