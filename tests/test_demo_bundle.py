"""`make demo` from a bundle (slow): it starts the federation from the bundle (flwr run on Ray,
no stage 1), then recognises held-out LFW people through a real `minusfed serve` on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minusfed import demo


@pytest.mark.slow
def test_demo_starts_from_a_bundle_and_recognises_through_the_service(lfw_root, tmp_path,
                                                                      capsys) -> None:
    from simulation.inprocess import run_inprocess
    first = tmp_path / "first"
    run_inprocess({"preset": "tiny", "stage1-rounds": 1, "stage2-rounds": 1, "local-epochs": 1,
                   "data-path": str(lfw_root), "out-dir": str(first), "min-nodes": 2,
                   "max-identities": 6, "server-eval-pairs": 100}, 2)
    out = tmp_path / "demo"
    rc = demo.main(["--data", str(lfw_root), "--out", str(out), "--nodes", "2",
                    "--stage2-rounds", "1", "--bundle", str(first / "final")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"Starts from the trained bundle {first / 'final'}" in text
    assert "stage2 1/1" in text and "stage1 " not in text           # no stage-1 round ran
    assert "identify top-1 correct" in text and "genuine accepted" in text
    run_dir = next(out.glob("federated-*"))
    start = json.loads((run_dir / "init_bundle.json").read_text())
    assert start["path"] == str((first / "final").resolve())
    assert (run_dir / "final" / "server" / "recognizer.safetensors").is_file()


def test_without_a_bundle_the_demo_says_it_trains_from_scratch(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo, "DEFAULT_BUNDLE", tmp_path / "absent")
    assert demo.chosen_bundle(None) is None
    assert demo.chosen_bundle(Path("none")) is None
    assert "Trains from scratch" in demo.starting_line(None, "tiny")
