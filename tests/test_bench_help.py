"""Every benchmark is a module of the `bench` package that `python -m bench.NAME --help` runs."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name != "common")


def test_every_benchmark_script_is_found():
    assert {"aggregate", "federated_lfw", "gpu", "report", "stage2_probe"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_the_module_command(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert f"usage: python -m bench.{name}" in capsys.readouterr().out
