"""Backbones, margin heads and the weight-decay split (docs/method.md, "Recognizers f and f_p",
"Margin heads")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from minusface.backbones import IResNet, MobileFaceNet, build_backbone, split_decay_params
from minusface.heads import ArcFace, CosFace, build_head


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def ir_models() -> dict[tuple[str, int], nn.Module]:
    """Built once: building IR-50 (44 M parameters) is the slow part on CPU."""
    torch.manual_seed(0)
    return {(n, c): build_backbone(n, c).eval() for n in ("ir18", "ir50") for c in (3, 192)}


# ---------------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", ["ir18", "ir50"])
@pytest.mark.parametrize("channels", [3, 192])
def test_ir_output_shape(ir_models, name: str, channels: int) -> None:
    with torch.no_grad():
        y = ir_models[name, channels](torch.randn(2, channels, 112, 112))
    assert y.shape == (2, 512)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("channels", [3, 192])
def test_mobilefacenet_output_shape(channels: int) -> None:
    model = build_backbone("mobilefacenet", channels).eval()
    assert isinstance(model, MobileFaceNet)
    with torch.no_grad():
        y = model(torch.randn(2, channels, 112, 112))
    assert y.shape == (2, 512)
    assert 1.0e6 < n_params(model) < 1.5e6  # ~1.2 M with a 512-d embedding


@pytest.mark.parametrize("name, expected", [("ir18", 24.1e6), ("ir50", 43.7e6)])
def test_ir_parameter_count_192_stem(ir_models, name: str, expected: float) -> None:
    assert n_params(ir_models[name, 192]) == pytest.approx(expected, rel=0.01)


def test_stem_is_the_only_difference_between_input_widths(ir_models) -> None:
    diff = n_params(ir_models["ir18", 192]) - n_params(ir_models["ir18", 3])
    assert diff == (192 - 3) * 64 * 9


def test_narrow_ir18_trains_with_small_batch() -> None:
    model = build_backbone("ir18", 192, width=16)
    assert isinstance(model, IResNet)
    assert n_params(model) < 5e6
    y = model(torch.randn(2, 192, 112, 112))  # train mode: BN1d needs a batch > 1
    assert y.shape == (2, 512)
    y.square().mean().backward()
    assert model.input_layer[0].weight.grad is not None


def test_stem_keeps_default_init_body_gets_tface_init(ir_models) -> None:
    """Default Conv2d init is uniform within 1/sqrt(fan_in); TFace's is N(0, 2/fan_out)."""
    model = ir_models["ir18", 192]
    stem = model.input_layer[0].weight
    bound = 1.0 / math.sqrt(stem[0].numel())
    assert stem.abs().max() <= bound
    assert stem.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    conv = model.body[1].res_layer[1].weight  # 64 -> 64, 3x3
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)
    assert conv.abs().max() > 1.0 / math.sqrt(64 * 9)  # unbounded normal, not the default


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="ir18.*ir50.*mobilefacenet"):
        build_backbone("resnet50", 3)


# -------------------------------------------------------------------------------------- heads

def two_class_head(cls, **kw):
    """2-d embeddings; class centres along the x and y axes (scaled: the head must normalise)."""
    head = cls(2, 2, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    return head


def at_angles(*thetas: float) -> torch.Tensor:
    return torch.tensor([[5 * math.cos(t), 5 * math.sin(t)] for t in thetas])


def test_arcface_hand_computed() -> None:
    s, m = 64.0, 0.5
    head = two_class_head(ArcFace, s=s, m=m)
    # theta to class 0: 1.0 (normal branch) and 3.0 (theta + m > pi: fallback)
    thetas = (1.0, 3.0)
    logits = head(at_angles(*thetas), torch.tensor([0, 0]))
    expected = torch.tensor([
        [s * math.cos(1.0 + m), s * math.sin(1.0)],
        [s * (math.cos(3.0) - m * math.sin(m)), s * math.sin(3.0)],
    ])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    # the fallback differs from the non-monotonic cos(theta + m)
    assert abs(logits[1, 0].item() - s * math.cos(3.0 + m)) > 10
    # the other class keeps the plain scaled cosine; labels on class 1 move the margin there
    logits1 = head(at_angles(1.0), torch.tensor([1]))
    torch.testing.assert_close(logits1, torch.tensor([[s * math.cos(1.0),
                                                       s * math.cos(math.pi / 2 - 1.0 + m)]]),
                               rtol=1e-4, atol=1e-3)


def test_cosface_hand_computed() -> None:
    s, m = 64.0, 0.35
    head = two_class_head(CosFace, s=s, m=m)
    logits = head(at_angles(1.0, 3.0), torch.tensor([0, 1]))
    expected = torch.tensor([
        [s * (math.cos(1.0) - m), s * math.sin(1.0)],
        [s * math.cos(3.0), s * (math.sin(3.0) - m)],
    ])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


def test_cosine_is_plain() -> None:
    head = two_class_head(ArcFace)
    torch.testing.assert_close(head.cosine(at_angles(0.3)),
                               torch.tensor([[math.cos(0.3), math.sin(0.3)]]))


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_gradients_reach_embeddings_and_centres(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, 16, 10)
    emb = torch.randn(4, 16, requires_grad=True)
    F.cross_entropy(head(emb, torch.tensor([0, 3, 3, 9])), torch.tensor([0, 3, 3, 9])).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_arcface_finite_gradient_at_zero_and_pi() -> None:
    """theta = 0 and theta = pi make sin(theta) = 0; the eps clamp keeps d sqrt finite."""
    head = two_class_head(ArcFace)
    emb = at_angles(0.0, math.pi).requires_grad_(True)
    labels = torch.tensor([0, 0])
    F.cross_entropy(head(emb, labels), labels).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_head_init_and_factory() -> None:
    torch.manual_seed(0)
    head = build_head("arcface", 512, 1000)
    assert head.weight.shape == (512, 1000)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert (head.s, head.m) == (64.0, 0.5)
    assert build_head("cosface", 8, 3).m == 0.35
    with pytest.raises(ValueError, match="arcface.*cosface"):
        build_head("sphereface", 8, 3)


# ----------------------------------------------------------------------------- decay split

@pytest.mark.parametrize("name", ["ir18", "mobilefacenet"])
def test_split_decay_params(name: str) -> None:
    model = build_backbone(name, 3, width=8 if name == "ir18" else None)
    decay, no_decay = split_decay_params(model)
    ids_d, ids_n = [id(p) for p in decay], [id(p) for p in no_decay]
    assert len(set(ids_d)) == len(ids_d) and len(set(ids_n)) == len(ids_n)
    assert not set(ids_d) & set(ids_n)
    assert set(ids_d) | set(ids_n) == {id(p) for p in model.parameters()}
    for mod in model.modules():
        own = list(mod.named_parameters(recurse=False))
        if isinstance(mod, _BatchNorm) and mod.affine:
            assert own and all(id(p) in ids_n for _, p in own)
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert id(mod.weight) in ids_d
        for pname, p in own:
            if pname == "bias":
                assert id(p) in ids_n
    # the IR's Linear has a bias; it must land in no_decay
    if name == "ir18":
        assert id(model.output_layer[3].bias) in ids_n
