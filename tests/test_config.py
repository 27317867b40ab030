"""The run config: pyproject.toml declares every key and default, task.config.RunConfig types and
checks them, and preset overrides reach the models the sites train."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path

import pytest
import torch

import task.config
from minusface.presets import PRESETS
from privacy.report import PRIVACY_PRESET_FOR, PRIVACY_PRESETS, privacy_preset_for
from task.config import RunConfig, run_config

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_every_declared_key_default_and_type_is_the_dataclass_one() -> None:
    """pyproject.toml's [tool.flwr.app.config] (what `flwr run` sends) has one key per RunConfig
    field, of the field's type, and its defaults are what run_config({}) gives."""
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    defaults = run_config({})
    flower = defaults.to_flower()
    assert list(flower) == list(declared())                        # same keys, declared order
    for key, value in declared().items():
        name = "preset_name" if key == "preset" else key.replace("-", "_")
        assert name in fields, key
        assert type(value) is hints[name], (key, value, hints[name])
        assert getattr(defaults, name) == value, key
    assert flower == declared()
    assert (defaults.weighting, defaults.max_num_examples, defaults.max_weight_ratio) \
        == ("num-examples", 1_000_000, 4.0)


def test_to_flower_round_trips_and_the_object_is_frozen() -> None:
    cfg = run_config({"preset": "cpu-small", "stage1-rounds": 3, "lr": 0.5, "aggregation": "Median"})
    assert run_config(cfg.to_flower()) == cfg
    assert json.loads(json.dumps(cfg.to_flower())) == cfg.to_flower()   # run_config.json
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_an_unknown_key_names_itself_and_the_valid_keys() -> None:
    with pytest.raises(ValueError) as info:
        run_config({"batchsize": 8})
    message = str(info.value)
    assert message.startswith("run config 'batchsize': unknown key; valid keys: ")
    assert "batch-size" in message and "stage1-rounds" in message


def test_ints_are_accepted_for_floats_but_not_the_other_way() -> None:
    assert run_config({"lr": 1}).lr == 1.0
    with pytest.raises(TypeError, match="run config 'batch-size': expected int, got 8.0"):
        run_config({"batch-size": 8.0})
    with pytest.raises(TypeError, match="run config 'privacy-eval': expected bool"):
        run_config({"privacy-eval": 1})


def test_no_override_is_the_named_preset() -> None:
    for name, preset in PRESETS.items():
        assert run_config({"preset": name}).preset() == preset


def test_overrides_replace_the_preset_fields() -> None:
    cfg = run_config({"preset": "cpu-small", "batch-size": 8, "lr": 0.2, "generator-width": 2,
                      "backbone": "ir50", "backbone-width": 4, "max-images-per-identity": 3})
    preset = cfg.preset()
    assert (preset.name, preset.batch_size, preset.lr, preset.generator_width) == \
        ("cpu-small", 8, 0.2, 2)
    assert (preset.backbone, preset.backbone_width, preset.max_images_per_identity) == \
        ("ir50", 4, 3)
    base = PRESETS["cpu-small"]
    assert (preset.weight_decay, preset.epochs, preset.milestones) == \
        (base.weight_decay, base.epochs, base.milestones)
    assert cfg.preset_overrides()["batch-size"] == 8
    mobile = run_config({"backbone": "mobilefacenet"}).preset()
    assert (mobile.backbone, mobile.backbone_width) == ("mobilefacenet", None)


@pytest.mark.parametrize("key, value, expected", [
    ("batch-size", 1, "0 (the preset's) or an integer >= 2"),
    ("batch-size", -4, "0 (the preset's) or an integer >= 2"),
    ("lr", -0.1, "0 (the preset's) or a finite number > 0"),
    ("lr", float("nan"), "0 (the preset's) or a finite number"),
    ("generator-width", -1, "0 (the preset's) or an integer >= 1"),
    ("backbone-width", -8, "0 (the preset's) or an integer >= 1"),
    ("max-images-per-identity", 1, "0 (the preset's) or an integer >= 2"),
    ("backbone", "resnet", "\"\" (the preset's) or one of ir18, ir50, mobilefacenet"),
    ("preset", "huge", "one of tiny, cpu-small, gpu-small, paper"),
])
def test_a_bad_override_names_the_key_and_what_was_expected(key: str, value: object,
                                                            expected: str) -> None:
    with pytest.raises(ValueError) as info:
        run_config({key: value})
    message = str(info.value)
    assert message.startswith(f"run config {key!r}: expected") and expected in message, message


def test_mobilefacenet_refuses_a_width() -> None:
    with pytest.raises(ValueError, match="run config 'backbone-width': expected 0 with backbone "
                                         "mobilefacenet"):
        run_config({"backbone": "mobilefacenet", "backbone-width": 16})


def test_the_wheel_copy_of_pyproject_is_read_first_and_a_missing_one_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed wheel has no pyproject.toml above task/: it carries task/pyproject.toml."""
    installed = tmp_path / "site-packages" / "task"
    installed.mkdir(parents=True)
    monkeypatch.setattr(task.config, "__file__", str(installed / "config.py"))
    with pytest.raises(FileNotFoundError, match="no pyproject.toml declaring the run config"):
        task.config.pyproject_path()
    (installed / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    assert task.config.pyproject_path() == installed / "pyproject.toml"


def test_a_pyproject_that_disagrees_with_runconfig_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = tmp_path / "app"
    (app / "task").mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text().replace("max-weight-ratio = 4.0\n", "")
    (app / "pyproject.toml").write_text(text)
    monkeypatch.setattr(task.config, "__file__", str(app / "task" / "config.py"))
    task.config.declared_defaults.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"missing \['max-weight-ratio'\]"):
            task.config.declared_defaults()
    finally:
        task.config.declared_defaults.cache_clear()


def test_every_training_preset_has_a_privacy_preset_and_the_names_exist() -> None:
    """Two registries (training, attacks) with one explicit link between them."""
    assert set(PRIVACY_PRESET_FOR) == set(PRESETS)
    assert set(PRIVACY_PRESET_FOR.values()) <= set(PRIVACY_PRESETS)
    for config in PRIVACY_PRESETS.values():
        assert {config.judge_preset, config.gi_preset} <= set(PRESETS), config.name
    assert privacy_preset_for("gpu-small") in PRIVACY_PRESETS
    with pytest.raises(ValueError, match="no privacy preset for training preset 'huge'"):
        privacy_preset_for("huge")


def test_preset_overrides_reach_the_sites_and_the_saved_models(lfw_root: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    """A whole in-process run (real ServerApp and ClientApp) with batch-size, lr and
    generator-width overrides: every site trains with them and final/ holds the overridden g."""
    from flwr.supercore.task_identity import TaskIdentity

    import clients.local
    from minusface.weights import load_generator
    from simulation.inprocess import run_inprocess

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    seen: list[tuple[int, int, float]] = []
    real_train_epoch = clients.local.train_epoch

    def recording_train_epoch(models, images, labels, preset, optimizer, *args, **kwargs):
        seen.append((preset.batch_size, models.frontend.generator.width,
                     optimizer.param_groups[0]["lr"]))
        return real_train_epoch(models, images, labels, preset, optimizer, *args, **kwargs)

    monkeypatch.setattr(clients.local, "train_epoch", recording_train_epoch)
    out = tmp_path / "run"
    cfg = {"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 0, "data-path": str(lfw_root),
           "out-dir": str(out), "min-nodes": 2, "max-identities": 8, "server-eval-pairs": 10,
           "batch-size": 4, "lr": 0.05, "generator-width": 2}
    run_inprocess(cfg, num_nodes=2)
    assert seen == [(4, 2, 0.05)] * 2
    assert load_generator(out / "final" / "generator.pt").width == 2
    models = torch.load(out / "final" / "models.pt", weights_only=True)
    assert models["preset-fields"]["batch_size"] == 4 and models["preset"] == "tiny"
    saved = json.loads((out / "run_config.json").read_text())
    assert run_config({k: v for k, v in saved.items() if k != "num-clients"}).preset() == \
        run_config(cfg).preset()


def test_privacy_cli_reads_the_runs_config_or_the_run_config_defaults(tmp_path: Path) -> None:
    """`minusfed privacy-eval --run DIR` rebuilds the sites' partition from the run's own
    run config (preset overrides included); without run_config.json its partition options
    default to pyproject.toml's run config."""
    import argparse

    from minusfed.privacy_cli import add_parser, run_settings

    parser = argparse.ArgumentParser(prog="minusfed")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run = run_config({"preset": "cpu-small", "max-images-per-identity": 4, "eval-fold": 3,
                      "data-path": str(tmp_path)})
    (tmp_path / "run_config.json").write_text(json.dumps({**run.to_flower(), "num-clients": 3,
                                                          "a-key-of-an-older-version": 1}))
    args = parser.parse_args(["privacy-eval", "--run", str(tmp_path), "--out", "o"])
    cfg, data, clients, _ = run_settings(args)
    assert (cfg, data, clients) == (run, tmp_path, 3)
    assert cfg.preset().max_images_per_identity == 4

    bare = tmp_path / "bare"
    bare.mkdir()
    args = parser.parse_args(["privacy-eval", "--run", str(bare), "--data", "/x", "--out", "o",
                              "--num-clients", "2", "--eval-fold", "5"])
    cfg, _, clients, source = run_settings(args)
    assert cfg == run_config({"eval-fold": 5}) and clients == 2 and "command-line" in source
    args = parser.parse_args(["privacy-eval", "--run", str(bare), "--data", "/x", "--out", "o",
                              "--num-clients", "2", "--fed-preset", "huge"])
    with pytest.raises(SystemExit, match="run config 'preset': expected one of tiny"):
        run_settings(args)
