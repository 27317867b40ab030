"""bench.report: the README Results section is rendered from saved results, with provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report


def _save(folder: Path, name: str, kind: str, data) -> None:
    (folder / name).write_text(json.dumps({"kind": kind, "command": f"python -m bench.{name}",
                                           "machine": "m1", "date": "2026-01-02", "commit": "abc",
                                           "data": data}))


def test_committed_results_render(tmp_path):
    section = report.render(report.load())
    assert section.startswith(report.START) and section.rstrip().endswith(report.END)
    assert "| measurement | value | machine, date | reproduce with |" in section


def test_rows_carry_machine_date_and_command_and_readme_is_rewritten(tmp_path):
    _save(tmp_path, "sim.json", "simulation", [
        {"clients": 1000, "sampled": 10, "rounds": 3, "status": "completed", "wall_seconds": 91.0,
         "peak_rss_gb": 3.2, "overhead_seconds_per_round": 4.5}])
    _save(tmp_path, "gen.json", "generic", {"rows": [
        {"section": "privacy", "measurement": "recovery SSIM", "value": "0.31"}]})
    section = report.render(report.load(tmp_path))
    assert "1000 virtual clients" in section and "peak RSS 3.20 GB" in section
    assert "| m1, 2026-01-02 | `python -m bench.sim.json` |" in section
    assert section.index("**Privacy**") < section.index("**Scale**")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n" + report.START + "\nold\n" + report.END + "\n\nafter\n")
    report.write_readme(section, readme)
    text = readme.read_text()
    assert "\nold\n" not in text and "recovery SSIM" in text and text.endswith("after\n")


def test_bad_results_file_is_named(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"kind": "gpu"}))
    with pytest.raises(ValueError, match="broken.json: missing fields"):
        report.load(tmp_path)
    _save(tmp_path, "broken.json", "nope", {})
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        report.load(tmp_path)


def test_federated_rows_of_the_old_server_loop_are_marked(tmp_path):
    row = {"accuracy": 0.75, "auc": 0.8}
    data = {"preset": {"name": "tiny", "epochs": 1},
            "rows": {"(a) unprotected, centralized": row,
                     "(c) MinusFace federated, 2 sites, f_p on X_p": row}}
    _save(tmp_path, "old.json", "federated_lfw", data)
    old = report.render(report.load(tmp_path))
    assert old.count("rerun needed") == 1 and "2 sites, f_p on X_p; numbers from the old" in old
    _save(tmp_path, "old.json", "federated_lfw", {**data, "federated_path": "ServerApp"})
    assert "rerun needed" not in report.render(report.load(tmp_path))


def _privacy(passed: bool, verdict: str) -> dict:
    m = {"minusface": {"ssim": 0.3, "psnr": 12.5}, "none": {"ssim": 0.97, "psnr": 31.0}}
    return {"metrics": m, "verdicts": {"minusface": verdict}, "n_eval_images": 9,
            "n_eval_identities": 3, "pixel_gate": {"passed": passed},
            "judge_gate": {"passed": False, "quality": "judge cross-image AUC 0.70"}}


def test_privacy_rows_carry_their_gate_and_verdict():
    rows = report.privacy_eval(_privacy(False, "no evidence (gate failed)"))
    assert {section for section, _, _ in rows} == {"privacy"}
    values = " ".join(value for _, _, value in rows)
    assert "0.300 / 12.50 dB: no evidence (gate failed)" in values
    assert "31.00 dB: gate failed" in values
    assert "refused (judge cross-image AUC 0.70)" in values
    passed = " ".join(value for _, _, value in report.privacy_eval(_privacy(True, "protected")))
    assert "gate passed" in passed and "dB: protected" in passed
