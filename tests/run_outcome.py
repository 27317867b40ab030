"""What a finished federated run's out-dir must show, however it was launched (in process,
`flwr run`, a TLS deployment, a Ray cluster): the sites' honest train replies were accepted in
every round, and training moved the global weights away from where the run started.

A run can report "completed" and write every file while aggregating nothing (every reply
refused, an aggregate dropped, a resume that silently starts over); these checks read only the
run's own output files (metrics.jsonl, run_config.json, final/models.pt) or what the server
sends, so they hold across refactors of the code that wrote them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from minusface.presets import Preset, get_preset
from simulation.inprocess import InProcessGrid
from task.models import initial_arrays
from task.records import STAGE1

MIN_MOVED = 0.9        # fraction of the floating-point arrays that one round of SGD changes


def metrics_lines(out: Path) -> list[dict]:
    """Every JSON line of the run's metrics.jsonl."""
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def round_numbers(out: Path) -> list[int]:
    """The rounds the server logged (one line each, without a "client" entry), in order."""
    return [r["round"] for r in metrics_lines(out) if "client" not in r]


def train_replies(out: Path, round_: int) -> list[dict]:
    """The round log entries of the train replies the server received in `round_`."""
    return [r["client"] for r in metrics_lines(out)
            if "client" in r and r["round"] == round_ and r["client"].get("phase") == "train"]


def assert_honest_replies_accepted(out: Path, every: bool = False,
                                   honest: set[int] | None = None) -> None:
    """Each logged round accepted at least one train reply with a positive weight and no
    problems; with `every`, each train reply of the honest nodes (all nodes when `honest` is
    None) was accepted.  Fails naming the round and what the server said."""
    rounds = sorted(set(round_numbers(out)))
    assert rounds, f"{out / 'metrics.jsonl'}: no round was logged"
    for round_ in rounds:
        replies = train_replies(out, round_)
        ok = [c for c in replies if c["accepted"] and not c["problems"] and c["weight"] > 0]
        assert ok, f"round {round_}: no train reply was accepted; the server logged {replies}"
        if every:
            mine = [c for c in replies if honest is None or c["node_id"] in honest]
            refused = [c for c in mine if c not in ok]
            assert mine and not refused, f"round {round_}: honest replies refused: {refused}"


def moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                   prefix: str = "") -> float:
    """Share of the floating-point arrays under `prefix` whose values changed."""
    keys = [k for k, v in before.items() if k.startswith(prefix) and v.is_floating_point()]
    assert keys, f"no floating-point array under {prefix!r}"
    missing = [k for k in keys if k not in after]
    assert not missing, f"arrays missing after training: {missing[:5]}"
    return sum(not torch.equal(before[k].float(), after[k].float()) for k in keys) / len(keys)


def assert_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                 prefixes: tuple[str, ...], what: str) -> None:
    """Nearly every floating-point array of each module in `prefixes` changed, and all finite."""
    for prefix in prefixes:
        share = moved_fraction(before, after, prefix)
        assert share >= MIN_MOVED, f"{what}: only {share:.0%} of the {prefix!r} arrays changed"
    bad = [k for k, v in after.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{what}: non-finite arrays {bad[:5]}"


def assert_stage1_weights_moved(out: Path) -> None:
    """final/models.pt's stage-1 weights (g and f) differ from the initial weights of the
    run's preset (as final/models.pt records it, overrides included) and seed
    (run_config.json) in nearly every array."""
    seed = int(json.loads((out / "run_config.json").read_text(encoding="utf-8"))["seed"])
    models = torch.load(out / "final" / "models.pt", weights_only=True)
    fields = models.get("preset-fields")
    preset = Preset(**fields) if fields else get_preset(str(models["preset"]))
    initial = initial_arrays(STAGE1, preset, seed)
    final = models["stage1"]
    assert set(final) == set(initial), "final stage-1 arrays have other keys than the initial"
    assert_moved(initial, final, ("generator.", "recognizer."), f"{out} final stage 1")


def capture_train_messages(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, dict]]:
    """What the server sends to the sites in process: per train message, in order, its
    ArrayRecords ("arrays", the frozen generator) as tensors.  The in-process grid is wrapped;
    the run itself is unchanged."""
    original = InProcessGrid.send_and_receive
    sent: list[dict[str, dict]] = []

    def recording(self: InProcessGrid, messages: Iterable[Message], *,
                  timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                sent.append({name: record.to_torch_state_dict()
                             for name, record in msg.content.array_records.items()})
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", recording)
    return sent
