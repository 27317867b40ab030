"""Stage objectives and optimizer: gradient routing, frozen g, LR ratio, decay groups, real faces."""
from __future__ import annotations

import torch

from minusface.backbones import build_backbone
from minusface.frontend import MinusFaceFrontend
from minusface.heads import ArcFace
from minusface.losses import freeze, stage1_loss, stage2_loss
from minusface.optim import build_optimizer, build_scheduler, lr_drops, lr_factor


def _tiny(in_channels: int, classes: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("ir18", in_channels, width=8), ArcFace(512, classes)


def test_stage1_gradients_reach_the_generator():
    fe = MinusFaceFrontend(width=4)
    f, head = _tiny(192)
    faces, labels = torch.rand(2, 3, 112, 112) * 2 - 1, torch.tensor([0, 1])
    loss, parts = stage1_loss(fe, f, head, faces, labels)
    loss.backward()
    grads = [p.grad for p in fe.generator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    assert set(parts) >= {"loss_gen", "loss_fr"}


def test_stage2_generator_gets_no_gradient_and_stays_bit_identical():
    fe = MinusFaceFrontend(width=4)
    freeze(fe.generator)
    before = {k: v.clone() for k, v in fe.generator.state_dict().items()}
    fp, head = _tiny(3)
    opt = build_optimizer([fp, head], lr=0.1, weight_decay=5e-4)
    assert not any(p is q for g in opt.param_groups for p in g["params"]
                   for q in fe.generator.parameters())
    for _ in range(2):
        loss, _ = stage2_loss(fe, fp, head, torch.rand(2, 3, 112, 112) * 2 - 1, torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in fe.generator.parameters())
    after = fe.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_generator_lr_ratio_survives_every_step_and_no_decay_groups():
    fe = MinusFaceFrontend(width=4)
    f, head = _tiny(192)
    opt = build_optimizer([f, head], lr=0.01, weight_decay=1e-4, generator=fe.generator,
                          generator_lr_ratio=0.5)
    sched = build_scheduler(opt, (2 / 6, 4 / 6, 5 / 6), total_steps=6)
    groups = {g["name"]: g for g in opt.param_groups}
    bn_and_bias = {id(p) for n, p in f.named_parameters() if n.endswith("bias") or ".bn" in n
                   or any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and p is q
                          for m in f.modules() for q in m.parameters(recurse=False))}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not (bn_and_bias & decayed)
    assert groups["generator-no-decay"]["weight_decay"] == 0.0
    seen = []
    for _ in range(6):
        seen.append((groups["recognizer"]["lr"], groups["generator"]["lr"]))
        assert abs(groups["generator"]["lr"] / groups["recognizer"]["lr"] - 0.5) < 1e-12
        assert groups["recognizer-no-decay"]["lr"] == groups["recognizer"]["lr"]
        opt.step()
        sched.step()
    assert [round(a, 8) for a, _ in seen] == [0.01, 0.01, 0.001, 0.001, 0.0001, 1e-05]



def test_lr_plan_drops_once_each_milestone_fraction_is_done():
    paper = (10 / 24, 18 / 24, 22 / 24)
    assert lr_drops(paper, 24) == [10, 18, 22]                    # epochs 10, 18, 22 of 24
    assert lr_drops(paper, 24 * 50) == [500, 900, 1100]           # same shape at any budget
    assert lr_drops((0.4, 0.8), 3) == [2, 3]                      # 2/3 >= 0.4 > 1/3
    assert lr_drops((0.5, 0.5, 2.0), 4) == [2, 2]                 # both at 2; 2.0 never
    assert [lr_factor(paper, done, 3) for done in range(3)] == [1.0, 1.0, 0.1]

def test_a_few_steps_on_real_faces_lower_the_stage1_loss(lfw_root):
    from clients.data import load_image
    people = ["Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Alejandro_Toledo"]
    faces, labels = [], []
    for k, name in enumerate(people):
        for p in sorted((lfw_root / "images" / name).glob("*.jpg"))[:2]:
            faces.append(load_image(p))
            labels.append(k)
    faces, labels = torch.stack(faces), torch.tensor(labels)
    torch.manual_seed(0)
    fe = MinusFaceFrontend(width=4)
    f, head = _tiny(192, classes=len(people))
    opt = build_optimizer([f, head], lr=0.01, weight_decay=5e-4, generator=fe.generator)
    f.train()
    first = None
    for _ in range(6):
        loss, parts = stage1_loss(fe, f, head, faces, labels)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last, _ = stage1_loss(fe, f, head, faces, labels)
    print(f"\nstage-1 loss on 8 LFW faces: {first:.3f} -> {float(last):.3f}")
    assert float(last) < first
