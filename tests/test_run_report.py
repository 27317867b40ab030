"""The run report's pictures: accuracy/AUC and site loss per round, the final ROC, faces/X_p."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from federation.curves import face_grid, roc_points
from federation.report import PICTURES, load_server_scores, save_server_scores, write_report
from tests.flower_log import FlowerLog


def _run_dir(tmp_path, rounds=4, sites=(101, 102)):
    lines = []
    for r in range(1, rounds + 1):
        stage = "stage1" if r <= rounds // 2 else "stage2"
        lines.append({"round": r, "stage": stage, "metrics": {
            "server_accuracy": 0.5 + 0.05 * r, "server_accuracy_std": 0.03, "server_auc": 0.5 + 0.06 * r,
            "server_eval_pairs": 200, "lr": 0.01, "round_seconds": 10.0}})
        for k, node in enumerate(sites):
            lines.append({"round": r, "stage": stage, "client": {
                "node_id": node, "phase": "train", "accepted": True,
                "metrics": {"num-examples": 30, "train_loss": 30.0 - r - k}}})
            lines.append({"round": r, "stage": stage, "client": {
                "node_id": node, "phase": "evaluate", "accepted": True,
                "metrics": {"accuracy": 0.6}}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rng = np.random.default_rng(0)
    same = np.arange(200) < 100
    scores = np.where(same, rng.normal(0.6, 0.15, 200), rng.normal(0.2, 0.15, 200))
    save_server_scores(tmp_path, rounds, "stage2", scores, same)
    return scores, same


def _png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_report_embeds_accuracy_loss_and_roc_pictures(tmp_path):
    scores, same = _run_dir(tmp_path)
    report = write_report(tmp_path).read_text()
    for name in PICTURES.values():
        assert f"]({name})" in report
        pixels = _png(tmp_path / name)
        assert pixels.shape[0] > 300 and pixels.std() > 10        # a drawn picture, not blank
    assert "- FAR 0.01: TAR " in report and "- FAR 0.001: TAR " in report
    assert "ROC curve" in report
    kept = load_server_scores(tmp_path)
    assert kept["round"] == 4 and np.allclose(kept["scores"], scores)
    assert kept["same"].tolist() == same.tolist()


def test_report_without_or_with_a_damaged_scores_file_still_has_its_curves(tmp_path):
    _run_dir(tmp_path)
    (tmp_path / "server_scores.json").write_text('{"round": 1, "stage": "stage1", "scores": [0.1]}')
    handler = FlowerLog()
    logging.getLogger("flwr").addHandler(handler)
    try:
        report = write_report(tmp_path).read_text()
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert "ROC" not in report and "report-accuracy.png" in report
    assert any("server_scores.json" in line and "no ROC curve" in line for line in handler.lines)
    (tmp_path / "server_scores.json").unlink()
    (tmp_path / "report-roc.png").unlink(missing_ok=True)
    assert "ROC" not in write_report(tmp_path).read_text()
    assert not (tmp_path / "report-roc.png").exists()


def test_roc_points_run_from_accept_all_to_reject_all():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    same = np.array([True, True, True, False, False, False])
    far, tar = roc_points(scores, same)
    assert (far[0], tar[0]) == (1.0, 1.0) and (far[-1], tar[-1]) == (0.0, 0.0)
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(tar) <= 0)
    assert np.any(np.isclose(far, 1 / 3) & (tar == 1.0))      # threshold 0.3: one false accept


def test_face_grid_puts_each_face_above_its_protected_image(lfw_root, tmp_path):
    from clients.data import load_image

    paths = sorted((lfw_root / "images").glob("A*/*_0001.jpg"))[:3]
    faces = np.stack([load_image(p).numpy() for p in paths])
    protected = np.zeros_like(faces)            # black X_p: the bottom row must be dark
    protected[:, 0] = 1.0                       # ... and red
    path = face_grid(faces, protected, [p.parent.name for p in paths], tmp_path / "grid.png",
                     "test grid")
    pixels = _png(path)
    h = pixels.shape[0]
    bottom = pixels[int(0.6 * h):int(0.85 * h)]
    red = (bottom[..., 0] > 200) & (bottom[..., 1] < 60) & (bottom[..., 2] < 60)
    assert red.mean() > 0.1                      # the X_p row shows the protected images
    with pytest.raises(ValueError, match="same number"):
        face_grid(faces, protected[:2], ["a", "b", "c"], tmp_path / "x.png", "t")


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under `logdir` (length, crc, event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_events_hold_server_metrics_and_site_losses(tmp_path):
    from federation.tensorboard import DIR, RunEvents

    events = RunEvents(tmp_path)
    for index, acc in ((1, 0.55), (2, 0.61)):
        events.round(index, {"server_accuracy": acc, "server_auc": float("nan"), "lr": 0.1,
                             "stage_round": 1, "clients_train_loss": 3.0},
                     [{"phase": "train", "node_id": 7, "site": "bank-a",
                       "metrics": {"train_loss": 4.0 - index}},
                      {"phase": "evaluate", "node_id": 7, "metrics": {"eval_loss": 9.0}},
                      {"phase": "train", "node_id": 8, "problems": ["non-finite update"]}])
    events.close()
    got = _scalars(tmp_path / DIR)
    assert got["server/accuracy"] == [(1, pytest.approx(0.55)), (2, pytest.approx(0.61))]
    assert got["run/lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.1))]
    assert got["site_loss/bank-a"] == [(1, 3.0), (2, 2.0)]
    assert "server/auc" not in got                 # NaN is left out, not plotted as a value
    assert set(got) == {"server/accuracy", "run/lr", "site_loss/bank-a"}
