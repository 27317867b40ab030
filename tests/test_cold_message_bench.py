"""bench.cold_message: a ClientApp message in a fresh process, cold then warm."""

from __future__ import annotations

import json

import pytest

from bench import cold_message


def test_cold_message_measures_each_kind_in_a_fresh_process(lfw_root, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert cold_message.main(["--data", str(lfw_root), "--repeats", "1",
                              "--kinds", "stage2,evaluate", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["stage2", "evaluate"]
    for r in rows:
        assert r["num_examples"] > 0                  # the handler really ran on the site's faces
        assert r["imports_s"] > 0 and r["cold_handler_s"] > 0 and r["warm_handler_s"] > 0
        assert r["process_wall_s"] > r["imports_s"] + r["cold_handler_s"]
    assert rows[0]["dynamo_loaded"] and rows[0]["dynamo_import_s"] > 0
    table = capsys.readouterr().out
    assert "| stage2 |" in table and "| evaluate |" in table


def test_cold_message_rejects_unknown_kinds(lfw_root):
    with pytest.raises(SystemExit):
        cold_message.main(["--data", str(lfw_root), "--kinds", "stage3"])
