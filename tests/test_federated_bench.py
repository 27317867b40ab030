"""bench.federated_lfw: its federated rows are the ServerApp's own numbers, from a real run."""

from __future__ import annotations

import json

import pytest
import torch

from bench import federated_lfw as fl
from federation.report import read_run_log
from task.config import run_config


def test_federated_run_config_is_one_the_server_accepts(tmp_path):
    both = fl.federated_config("tiny", 3, ["stage1", "stage2"], 4, 1, tmp_path, tmp_path / "o",
                               "float16", 7, None, 20)
    run_config(both)                                 # raises on a key or value the app refuses
    assert (both["stage1-rounds"], both["stage2-rounds"], both["min-nodes"]) == (3, 3, 4)
    assert both["max-identities"] == 0 and both["server-eval-pairs"] == 20   # 0 = all
    only1 = fl.federated_config("tiny", 2, ["stage1"], 2, 0, tmp_path, tmp_path / "o",
                                "float32", 0, 8, None)
    assert only1["stage2-rounds"] == 0 and only1["server-eval-pairs"] == 0


def test_weight_drift_is_relative_l2_over_float_tensors():
    ref = {"a": torch.tensor([3.0, 4.0]), "n": torch.tensor(5)}
    other = {"a": torch.tensor([3.0, 4.5]), "n": torch.tensor(9)}
    assert fl.weight_drift(ref, ref) == 0.0
    assert abs(fl.weight_drift(ref, other) - 0.1) < 1e-12


def test_unknown_wire_dtype_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fl.main(["--wire-dtype", "int8", "--out", str(tmp_path)])
    assert "--wire-dtype 'int8'" in capsys.readouterr().err


@pytest.mark.slow      # a whole in-process federation on real faces: about a minute on 2 cores
def test_smoke_run_reports_the_serverapps_own_evaluation(lfw_root, tmp_path):
    res = fl.main(["--preset", "tiny", "--only", "federated", "--federated-stages", "stage1",
                   "--clients", "2", "--epochs", "1", "--max-identities", "8",
                   "--max-pairs", "20", "--data", str(lfw_root), "--out", str(tmp_path)])
    row = res["rows"]["(c1) MinusFace federated, 2 sites, stage 1"]
    run_dir = tmp_path / "federated-float32"
    rounds, replies = read_run_log(run_dir)
    assert [r["stage"] for r in rounds] == ["stage1"]
    served = rounds[-1]["metrics"]
    assert row["accuracy"] == served["server_accuracy"] and row["auc"] == served["server_auc"]
    assert served["server_eval_pairs"] == 20
    assert row["rounds_aggregated"] == 1                    # the round changed the model
    assert [r["client"]["accepted"] for r in replies] == [True, True]   # both sites' replies
    assert sum(res["federated_site_examples"]["float32"]) == res["train_images"]
    assert res["federated_round_seconds"]["float32"]["stage1"] == [served["round_seconds"]]
    assert (run_dir / "final" / "models.pt").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["rows"].keys() == res["rows"].keys()
