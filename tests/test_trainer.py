"""Centralized trainers: learning on real faces, and resume continuing the same schedule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.data import load_faces
from minusface.images import to_signed
from minusface.presets import get_preset
from minusface.trainer import Trainer, build_models, evaluate_verification


@pytest.fixture(scope="module")
def small_lfw(lfw_root, tmp_path_factory):
    """16 people with >= 8 images: 6 to train on, 2 held out per person for pairs."""
    people = sorted(p for p in (lfw_root / "images").iterdir()
                    if p.is_dir() and len(list(p.glob("*.jpg"))) >= 8)[:16]
    train, held = {}, []
    for p in people:
        files = sorted(str(f) for f in p.glob("*.jpg"))[:8]
        train[p.name], held = files[:6], held + [(p.name, f) for f in files[6:]]
    ds = load_faces(train, cache=tmp_path_factory.mktemp("cache") / "small.npz", progress=False)
    eval_ds = load_faces({n: [f for m, f in held if m == n] for n in train}, progress=False)
    faces = to_signed(eval_ds.images)
    labels = eval_ds.labels
    a, b = np.triu_indices(len(labels), k=1)
    return ds, faces, a, b, labels[a] == labels[b]


def test_training_improves_verification_auc_over_the_untrained_model(small_lfw, tmp_path):
    ds, faces, a, b, same = small_lfw
    preset = get_preset("tiny").with_(epochs=4, lr=0.05, head_s=32.0, head_m=0.2, batch_size=16)
    torch.manual_seed(0)
    untrained = build_models("baseline", preset, ds.num_classes)
    before = evaluate_verification(untrained, faces, a, b, same, folds=np.arange(len(same)) % 10)
    trained = Trainer("baseline", preset, ds.images, ds.labels, tmp_path, progress=False).run()
    after = evaluate_verification(trained, faces, a, b, same, folds=np.arange(len(same)) % 10)
    print(f"\nheld-out pair AUC: untrained {before['auc']:.3f} -> trained {after['auc']:.3f}")
    assert after["auc"] > before["auc"] + 0.03


def test_resume_continues_the_same_schedule_and_weights(small_lfw, tmp_path):
    ds = small_lfw[0]
    preset = get_preset("tiny").with_(epochs=3, milestones=(0.4, 0.8))
    straight = Trainer("baseline", preset, ds.images, ds.labels, tmp_path / "a", progress=False)
    ref = straight.run()
    interrupted = Trainer("baseline", preset, ds.images, ds.labels, tmp_path / "b", progress=False)
    interrupted.run(stop_after_epoch=0)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 0
    resumed = Trainer("baseline", preset, ds.images, ds.labels, tmp_path / "b", progress=False)
    out = resumed.run()
    assert resumed.start_epoch == 1
    def lr(d):
        return [json.loads(x)["lr"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert lr(tmp_path / "a") == lr(tmp_path / "b")
    assert lr(tmp_path / "a")[-1] < lr(tmp_path / "a")[0]           # the schedule stepped
    for (k, v), w in zip(ref.recognizer.state_dict().items(), out.recognizer.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
