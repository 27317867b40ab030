"""MinusFace stage 1 learns something that carries to people it never saw.

The other learning test trains the unprotected recipe and scores held-out *images* of the
people it trained on. A face recognizer is used on strangers, so this one trains stage 1
(g + f on the residue, the cheapest preset) on one group of LFW people and scores
verification pairs among a disjoint group, against the same model untrained.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.data import load_faces
from minusface.images import to_signed
from minusface.presets import get_preset
from minusface.trainer import Trainer, build_models, evaluate_verification

TRAIN_PEOPLE, TEST_PEOPLE = 24, 12


@pytest.fixture(scope="module")
def disjoint_lfw(lfw_root, tmp_path_factory):
    """Train on 24 people (8 images each); pairs among 12 *other* people (6 images each)."""
    people = sorted(p for p in (lfw_root / "images").iterdir()
                    if p.is_dir() and len(list(p.glob("*.jpg"))) >= 8)
    train_people, test_people = people[:TRAIN_PEOPLE], people[TRAIN_PEOPLE:TRAIN_PEOPLE + TEST_PEOPLE]
    train = {p.name: sorted(str(f) for f in p.glob("*.jpg"))[:8] for p in train_people}
    test = {p.name: sorted(str(f) for f in p.glob("*.jpg"))[:6] for p in test_people}
    assert not set(train) & set(test)
    ds = load_faces(train, cache=tmp_path_factory.mktemp("cache") / "train.npz", progress=False)
    held = load_faces(test, progress=False)
    a, b = np.triu_indices(len(held.labels), k=1)
    return ds, to_signed(held.images), a, b, held.labels[a] == held.labels[b]


@pytest.mark.slow       # about a minute of stage-1 training on 2 busy cores
def test_stage1_beats_the_untrained_model_on_people_it_never_saw(disjoint_lfw, tmp_path):
    ds, faces, a, b, same = disjoint_lfw
    preset = get_preset("tiny").with_(epochs=6, lr=0.05, head_s=32.0, head_m=0.2, batch_size=16,
                                      max_images_per_identity=None)
    folds = np.arange(len(same)) % 10
    torch.manual_seed(0)
    untrained = build_models("stage1", preset, ds.num_classes)
    before = evaluate_verification(untrained, faces, a, b, same, folds=folds)
    torch.manual_seed(0)
    trained = Trainer("stage1", preset, ds.images, ds.labels, tmp_path, progress=False).run()
    after = evaluate_verification(trained, faces, a, b, same, folds=folds)
    print(f"\nunseen-identity pair AUC ({int(same.sum())} genuine / {int((~same).sum())} impostor): "
          f"untrained {before['auc']:.3f} -> stage 1 {after['auc']:.3f}")
    assert after["auc"] > before["auc"] + 0.03
