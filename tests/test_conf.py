"""conf/*.toml: every experiment file is a valid run config that `flwr run --run-config` takes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import fuse_dicts, parse_config_args

from task.config import declared_defaults, run_config

CONF = Path(__file__).resolve().parents[1] / "conf"
FILES = sorted(CONF.glob("*.toml"))


def test_there_is_a_file_per_preset_and_per_federated_results_row():
    names = {p.stem for p in FILES}
    assert {"tiny", "cpu-small", "gpu-small", "paper"} <= names
    assert any(n.startswith("results-") for n in names)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_conf_file_is_a_valid_run_config_as_flower_reads_it(path):
    # the parser behind `flwr run --run-config FILE`, then the fusion with pyproject's defaults
    # that refuses undeclared keys, then minusfed's own typed and range-checked config
    overrides = parse_config_args([str(path)])
    assert overrides == tomllib.loads(path.read_text(encoding="utf-8")), "flat keys only"
    fused = fuse_dicts(declared_defaults(), overrides)
    cfg = run_config(fused)
    preset = cfg.preset()
    assert preset.name == overrides["preset"]
    assert cfg.stage1_rounds >= 1
    # data-path and out-dir come from the user or the environment, never from a shared file
    assert "data-path" not in overrides and "out-dir" not in overrides
    head = path.read_text(encoding="utf-8").splitlines()[0]
    assert head.startswith("# "), f"{path.name}: first line should say what the run is"
    assert f"conf/{path.name}" in path.read_text(encoding="utf-8"), "the command to run it"


def test_a_wrong_value_in_a_conf_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\nbatch-size = 1\n')
    with pytest.raises(ValueError, match="run config 'batch-size': expected"):
        run_config(fuse_dicts(declared_defaults(), parse_config_args([str(bad)])))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('preset = "tiny"\nbatchsize = 16\n')
    with pytest.raises(ValueError, match="batchsize"):
        fuse_dicts(declared_defaults(), parse_config_args([str(unknown)]))
