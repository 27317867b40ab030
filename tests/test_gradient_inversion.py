"""Update leakage (gradient inversion) and the Flower "evaluate.privacy" action (tiny, CPU)."""
from __future__ import annotations

import json
import math
import time
from functools import partial

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from minusface.backbones import build_backbone
from minusface.frontend import MinusFaceFrontend
from minusface.heads import build_head
from privacy.gradient_inversion import (
    LinearProbe,
    attack_local_steps,
    attack_update,
    client_update,
    evaluate_gradient_inversion,
    faces_input,
    gradient_from_update,
    shared_parameters,
    simulate_update,
)
from privacy.metrics import psnr, ssim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def faces(lfw_root):
    """4 faces of 4 identities, (4, 3, 112, 112) in [-1, 1], and their labels."""
    from clients.data import load_faces, scan_identity_folders
    from minusface.images import to_signed
    found = scan_identity_folders(lfw_root / "images", min_images_per_identity=2)
    ds = load_faces({n: ps[:1] for n, ps in found[:4]}, progress=False)
    return to_signed(ds.images), ds.labels


def test_update_gives_back_the_exact_gradient():
    torch.manual_seed(0)
    model, head = LinearProbe(embedding_size=16), build_head("arcface", 16, 3)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    y = torch.tensor([0, 2])
    update = client_update(model, head, x, y, lr=0.1, weight_decay=5e-4)
    before = {n: p.detach() for n, p in shared_parameters(model).items()}
    grad = gradient_from_update(update, before, 0.1, 5e-4)
    loss = torch.nn.functional.cross_entropy(head(model(x), y), y)
    true = torch.autograd.grad(loss, list(shared_parameters(model).values()))
    for (name, g), t in zip(grad.items(), true):
        assert torch.allclose(g, t, atol=1e-5, rtol=1e-3), name
    assert all(p.grad is None for p in model.parameters())      # caller's model untouched


def test_the_attackers_unrolled_local_steps_are_the_clients_update():
    torch.manual_seed(0)
    model, head = LinearProbe(embedding_size=16), build_head("arcface", 16, 3)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    y = torch.tensor([0, 2])
    real = client_update(model, head, x, y, lr=0.1, weight_decay=5e-4, local_steps=3)
    sim = simulate_update(model, head, x, y, 0.1, 5e-4, 0.9, 3, create_graph=False)
    one = client_update(model, head, x, y, lr=0.1, weight_decay=5e-4, local_steps=1)
    for name in real:
        assert torch.allclose(sim[name], real[name], atol=1e-6, rtol=1e-4), name
    assert any(not torch.allclose(real[n], 3 * one[n], rtol=1e-3) for n in real)  # not linear


def test_multi_step_inversion_recovers_unprotected_faces(faces):
    x, _ = faces
    originals = (x[:2] * 0.5 + 0.5).clamp(0, 1)
    torch.manual_seed(0)
    head = build_head("arcface", 512, 2)
    inv = attack_local_steps(LinearProbe(), head, originals, torch.tensor([0, 1]), faces_input,
                             local_steps=3, client_lr=0.1, steps=120, seed=0)
    grey = torch.full_like(originals, 0.5)
    p_rec, p_grey = psnr(inv.images, originals), psnr(grey, originals)
    print(f"\nmulti-step GI probe, 3 local steps, B=2, 120 steps: PSNR {p_rec:.2f} vs grey "
          f"{p_grey:.2f}, update cos {inv.gradient_cosine:.3f}")
    assert p_rec > p_grey + 2.0 and inv.gradient_cosine > 0.9
    assert p_rec > psnr(inv.images.flip(0), originals) + 2.0


def test_gradient_inversion_recovers_unprotected_faces_and_only_x_p_under_minusface(faces):
    x, labels = faces
    originals = (x[:2] * 0.5 + 0.5).clamp(0, 1)
    y = torch.tensor([0, 1])
    torch.manual_seed(0)
    head = build_head("arcface", 512, 2)

    # (1) the attack works: the leaky probe's update gives the faces back
    t0 = time.perf_counter()
    inv = attack_update(LinearProbe(), head, originals, y, faces_input, steps=120, lr=0.05,
                        tv=0.01, seed=0)
    grey = torch.full_like(originals, 0.5)
    rand = torch.rand(originals.shape, generator=torch.Generator().manual_seed(1))
    p_rec, p_grey, p_rand = psnr(inv.images, originals), psnr(grey, originals), psnr(rand, originals)
    p_swap = psnr(inv.images.flip(0), originals)
    print(f"\nGI probe, B=2, 120 steps ({time.perf_counter() - t0:.1f} s): PSNR {p_rec:.2f} "
          f"SSIM {ssim(inv.images, originals):.3f} grad cos {inv.gradient_cosine:.3f} | grey "
          f"{p_grey:.2f} / {ssim(grey, originals):.3f}, random {p_rand:.2f} / "
          f"{ssim(rand, originals):.3f}, swapped reconstructions {p_swap:.2f}")
    assert p_rec > p_rand + 5.0
    assert p_rec > p_grey + 2.0
    assert p_rec > p_swap + 2.0                     # each reconstruction is its own face
    assert inv.losses[-1] < inv.losses[0]

    # (2) tiny preset recognizer (IR-18, w = 8): the same code runs; few steps, numbers printed
    torch.manual_seed(0)
    ir = build_backbone("ir18", 3, width=8)
    t0 = time.perf_counter()
    inv_ir = attack_update(ir, head, originals, y, faces_input, steps=8, seed=0)
    print(f"GI tiny IR-18, B=2, 8 steps ({time.perf_counter() - t0:.1f} s): PSNR "
          f"{psnr(inv_ir.images, originals):.2f} SSIM {ssim(inv_ir.images, originals):.3f} "
          f"grad cos {inv_ir.gradient_cosine:.3f}")
    assert inv_ir.images.shape == originals.shape and torch.isfinite(inv_ir.images).all()
    assert psnr(inv_ir.images, originals) > p_rand
    assert inv_ir.losses[-1] < inv_ir.losses[0]

    # (3) MinusFace stage 2: the update is made from X_p, so X_p is what comes back
    torch.manual_seed(0)
    frontend = MinusFaceFrontend(width=2).eval()
    # seeded permutations (protect's test-only `rng`): X_p, and with it the grey guess's score
    # against X_p, otherwise changes per run; unseeded, the 2 dB margin below failed in about
    # 1 run in 6 (margins 1.6-4.9 dB over 7 runs)
    protect = partial(frontend.protect, rng=torch.Generator().manual_seed(0))
    res = evaluate_gradient_inversion(x, labels, protect, ir, head, images=2, steps=2,
                                      probe_steps=100, seed=0, local_steps=2)
    m = res["metrics"]
    print("GI rows:", json.dumps({k: {a: round(v[a], 3) for a in ("psnr", "ssim", "grad_cos")
                                      if a in v} for k, v in m.items()}))
    assert {"gi/none", "gi/minusface", "gi/minusface vs X_p", "gi-probe/none",
            "gi-probe/minusface", "gi-probe/minusface vs X_p", "reference: grey guess",
            "reference: random image", "gi-steps2/none", "gi-steps2/minusface",
            "gi-steps2/minusface vs X_p"} <= set(m)
    assert m["gi-probe/none"]["psnr"] > m["gi-probe/minusface"]["psnr"] + 3.0
    assert m["gi-probe/minusface vs X_p"]["psnr"] > m["gi-probe/minusface"]["psnr"]
    assert m["gi-probe/minusface vs X_p"]["psnr"] > m["reference: grey guess vs X_p"]["psnr"] + 2.0
    assert set(res["_images"]) >= {"original", "X_p", "gi/none", "gi/minusface"}


# --------------------------------------------------------------------------- Flower action

@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


TINY_OVERRIDES = {"inverter-epochs": 1, "aux-images": 8, "eval-images": 6, "batch-size": 4,
                  "linkage-width": 8, "gi-images": 2, "gi-steps": 2, "gi-probe-steps": 10}


def _privacy_request(lfw_root, tmp_path, preset: str, privacy_preset: str, overrides: dict):
    """(context of site 7 of a `preset` run, the server's evaluate.privacy message to it)."""
    from federation.privacy_round import privacy_messages
    from federation.server_app import initial_arrays
    from minusface.generator import UNetGenerator
    from minusface.presets import get_preset
    from task.records import STAGE2

    cfg = {"preset": preset, "data-path": str(lfw_root), "out-dir": str(tmp_path),
           "max-identities": 12, "min-nodes": 2}
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg)
    torch.manual_seed(0)
    gen = {f"generator.{k}": v for k, v in UNetGenerator(width=4).state_dict().items()}
    rec = initial_arrays(STAGE2, get_preset(preset), 1)
    (msg,) = privacy_messages([7], gen, rec, privacy_preset, 0, overrides)
    return ctx, msg


def test_privacy_action_replies_only_numbers(lfw_root, tmp_path):
    from clients.client_app import app
    from federation.privacy_round import write_privacy_summary
    from task.records import PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD

    ctx, msg = _privacy_request(lfw_root, tmp_path, "tiny", "tiny", TINY_OVERRIDES)
    assert msg.metadata.message_type == PRIVACY_MESSAGE_TYPE == "evaluate.privacy"
    msg = Message(msg.content, 7, PRIVACY_MESSAGE_TYPE, group_id="privacy")
    t0 = time.perf_counter()
    reply = app(msg, ctx)
    seconds = time.perf_counter() - t0
    assert not reply.has_error(), reply.error
    content = reply.content
    assert list(content.keys()) == [PRIVACY_RECORD]
    assert not content.array_records and not content.config_records
    assert all(isinstance(r, MetricRecord) for r in content.values())
    metrics = dict(content[PRIVACY_RECORD])
    assert metrics and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in metrics.values())
    assert metrics["aux-own-identities"] == 1 and metrics["n-eval-identities"] >= 2
    for key in ("minusface/ssim", "minusface/psnr", "f_p linkage/n", "gi/none/psnr",
                "gi/minusface/psnr", "gi/minusface vs X_p/psnr", "gi-probe/none/psnr"):
        assert key in metrics and math.isfinite(metrics[key]), key
    print(f"\nevaluate.privacy on one tiny site: {seconds:.1f} s, {len(metrics)} numbers")
    summary = write_privacy_summary({"node-7": metrics, "node-8": {"error": "boom"}},
                                    tmp_path / "privacy")
    text = summary.read_text()
    assert "| node-7 | gi/minusface |" in text and "error: boom" in text
    assert json.loads((tmp_path / "privacy" / "node-7.json").read_text())["gi/none/psnr"]


def test_privacy_action_of_a_gpu_small_run_uses_its_privacy_preset(lfw_root, tmp_path):
    """Bug: a site used the run's TRAINING preset name as the privacy preset, so a gpu-small
    run with privacy-eval failed with "unknown privacy preset".  A message that names no
    privacy preset must fall back to privacy_preset_for(the run's preset) (task.config's
    RunConfig says which training preset; privacy.report.PRIVACY_PRESET_FOR maps it)."""
    from clients.client_app import app
    from privacy.report import get_privacy_config, privacy_preset_for
    from task.records import CONFIG, PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD

    with pytest.raises(ValueError, match="unknown privacy preset 'gpu-small'"):
        get_privacy_config("gpu-small")                   # what the site used to ask for
    overrides = {**TINY_OVERRIDES, "inverter-width": 4, "judge-epochs": 1, "gi-images": 0}
    ctx, msg = _privacy_request(lfw_root, tmp_path, "gpu-small", "unused", overrides)
    conf = dict(msg.content[CONFIG])
    del conf["privacy-preset"]                             # the site must pick it itself
    msg.content[CONFIG] = ConfigRecord(conf)
    reply = app(Message(msg.content, 7, PRIVACY_MESSAGE_TYPE, group_id="privacy"), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content[PRIVACY_RECORD])
    assert privacy_preset_for("gpu-small") == "cpu-small"
    assert metrics["n-eval-images"] >= 2 and math.isfinite(metrics["minusface/psnr"])


def test_run_privacy_round_sends_the_action_to_every_node_and_writes_files(tmp_path):
    from federation.privacy_round import run_privacy_round
    from task.records import PRIVACY_MESSAGE_TYPE, PRIVACY_RECORD

    class FakeGrid:
        sent: list = []

        def get_node_ids(self):
            return [3, 1, 2]

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:
                self.sent.append(m)
                if m.metadata.dst_node_id == 2:
                    continue                                  # a node that never answers
                reply = Message(RecordDict({PRIVACY_RECORD: MetricRecord(
                    {"minusface/psnr": 9.5, "gi/none/psnr": 8.0})}), reply_to=m)
                replies.append(reply)
            return replies

    grid = FakeGrid()
    gen = {"generator.enc1.0.weight": torch.zeros(4, 192, 3, 3)}
    path = run_privacy_round(grid, tmp_path, gen, None, "tiny", seed=3,
                             overrides={"gi-steps": 5})
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3]
    m = grid.sent[0]
    assert m.metadata.message_type == PRIVACY_MESSAGE_TYPE and "arrays" not in m.content
    assert m.content["config"]["gi-steps"] == 5 and "frozen-generator" in m.content
    summary = json.loads((tmp_path / "privacy" / "summary.json").read_text())
    assert summary["node-2"] == {"error": "no reply"}
    assert summary["node-1"]["gi/none/psnr"] == 8.0
    assert "| node-3 | minusface |" in path.read_text()
