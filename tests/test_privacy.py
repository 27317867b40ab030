"""privacy/: metrics, attacker views, the inverter attack and the report (all tiny, CPU)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from minusface.backbones import build_backbone
from minusface.frontend import MinusFaceFrontend
from privacy.attacks import (
    VIEW_KINDS,
    as_faces,
    judge_embed_fn,
    make_views,
    random_permutation,
    recover,
    to_unit,
    train_inverter,
    views_fn,
)
from privacy.metrics import identity_match, ms_ssim, psnr, ssim
from privacy.report import PRIVACY_PRESETS, attacker_description, evaluate_client, write_report, write_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lfw_faces(lfw_root):
    """52 faces: 40 auxiliary identities (1 face each) + 12 faces of 6 other identities."""
    from clients.data import load_faces, scan_identity_folders
    found = scan_identity_folders(lfw_root / "images", min_images_per_identity=2)
    client = {n: ps[:2] for n, ps in found[:6]}
    aux = {n: ps[:1] for n, ps in found[6:46]}
    c = load_faces(client, progress=False)
    a = load_faces(aux, progress=False)
    assert not set(c.identities) & set(a.identities)
    return a.images, c.images, c.labels, list(c.identities), list(a.identities)


@pytest.fixture(scope="module")
def frontend():
    torch.manual_seed(0)
    return MinusFaceFrontend(width=2).eval()


# --------------------------------------------------------------------------- metrics

def test_ssim_identical_is_one_and_psnr_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 112, 112, generator=g)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, torch.rand(2, 3, 112, 112, generator=g)) < 0.1
    # per-image PSNR, then mean: errors 0.1 and 0.01 everywhere -> 20 dB and 40 dB -> 30 dB
    x = torch.zeros(2, 3, 112, 112)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    assert psnr(x, y) == pytest.approx((10 * math.log10(1 / 0.01) + 10 * math.log10(1 / 1e-4)) / 2,
                                       abs=1e-4)
    assert psnr(x, x) == pytest.approx(100.0)          # MSE floor 1e-10


def test_identity_match_perfect_when_recovered_equals_originals():
    g = torch.Generator().manual_seed(1)
    faces = torch.rand(12, 3, 112, 112, generator=g)

    def judge(x):
        return torch.nn.functional.avg_pool2d(x - 0.5, 8).flatten(1)

    m = identity_match(judge, faces, faces)
    assert m["tar@0.01"] == 1.0 and m["tar@0.001"] == 1.0 and m["rank1"] == 1.0
    assert m["n_impostor"] == 12 * 11
    labels = np.repeat(np.arange(6), 2)
    m = identity_match(judge, faces, faces, labels=labels)
    assert m["tar@0.01"] == 1.0 and m["rank1"] == 1.0 and m["n_impostor"] == 12 * 10
    shuffled = identity_match(judge, faces.flip(0), faces)
    assert shuffled["rank1"] == 0.0


# --------------------------------------------------------------------------- views

def test_make_views_shapes_ranges_and_randomness(frontend):
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    theta = random_permutation(seed=7)
    views = {k: make_views(frontend, faces, k, permutation=theta) for k in VIEW_KINDS}
    for k, v in views.items():
        assert v.shape == (2, 3, 112, 112), k
        assert v.dtype == torch.float32 and float(v.min()) >= 0.0 and float(v.max()) <= 1.0, k
    assert torch.allclose(views["none"], to_unit(faces))
    again = make_views(frontend, faces, "minusface")
    assert not torch.equal(again, views["minusface"])           # fresh theta every call
    fixed = make_views(frontend, faces, "fixed-permutation", permutation=theta)
    assert torch.equal(fixed, views["fixed-permutation"])      # one known theta: deterministic
    assert torch.equal(make_views(frontend, faces, "no-shuffle"), views["no-shuffle"])
    with pytest.raises(ValueError):
        make_views(frontend, faces, "fixed-permutation")
    with pytest.raises(ValueError):
        make_views(frontend, faces, "bogus")


# --------------------------------------------------------------------------- attack works

def test_inverter_recovers_unprotected_faces(lfw_faces):
    aux, client, _, _, _ = lfw_faces
    inv = train_inverter(views_fn(None, "none"), aux[:24], epochs=5, batch_size=4, width=8,
                         progress=False)
    originals = to_unit(as_faces(client))
    rec = recover(inv, make_views(None, client, "none"))
    grey = torch.full_like(originals, 0.5)
    s_rec, s_grey = ssim(rec, originals), ssim(grey, originals)
    print(f"tiny inverter on unprotected faces: SSIM {s_rec:.3f} vs grey {s_grey:.3f}, "
          f"PSNR {psnr(rec, originals):.2f} vs {psnr(grey, originals):.2f}")
    assert s_rec > s_grey + 0.15
    assert psnr(rec, originals) > psnr(grey, originals)


def test_perceptual_identity_loss_moves_the_inverter_not_the_recognizer():
    from privacy.attacks import Inverter, RecognizerFeatures, perceptual_identity_loss

    torch.manual_seed(0)
    judge = build_backbone("ir18", 3, width=8).eval()
    features = RecognizerFeatures(judge)
    target = torch.rand(2, 3, 112, 112)
    taps, emb = features(target)
    assert len(taps) == 2 and emb.shape == (2, 512)        # stem, first stage; embedding
    inv = Inverter(4)
    loss_fn = perceptual_identity_loss(features, perceptual=1.0, identity=1.0)
    loss = loss_fn(inv, torch.rand(2, 3, 112, 112), target)
    plain = torch.nn.functional.l1_loss(inv(torch.rand(2, 3, 112, 112)), target)
    assert loss.item() > plain.item() * 0.5
    loss.backward()
    assert all(p.grad is not None for p in inv.parameters() if p.requires_grad)
    assert all(p.grad is None for p in judge.parameters())
    assert perceptual_identity_loss(features, 0.0, 0.0)(inv, target, target).item() == \
        pytest.approx(torch.nn.functional.l1_loss(inv(target), target).item(), rel=1e-5)


def test_the_pretrained_student_starts_as_the_recognizer_and_fine_tunes_a_copy(lfw_faces, frontend):
    from privacy.attacks import AdaptedRecognizer, train_pretrained_student

    aux = lfw_faces[0][:8]
    torch.manual_seed(0)
    judge = build_backbone("ir18", 3, width=8).eval().requires_grad_(False)
    judge.to(memory_format=torch.channels_last)     # as the CPU policy's bf16 plan leaves it
    before = {k: v.clone() for k, v in judge.state_dict().items()}
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(AdaptedRecognizer(judge).eval()(x), judge(x), atol=1e-6)
    student = train_pretrained_student(views_fn(frontend, "minusface"), aux, judge,
                                       judge_embed_fn(judge), epochs=2, batch_size=4,
                                       progress=False, eval_every=1, patience=10)
    assert isinstance(student, AdaptedRecognizer) and not student.training
    assert all(p.is_contiguous() for p in student.recognizer.parameters())   # NCHW copy
    assert all(torch.equal(v, judge.state_dict()[k]) for k, v in before.items())  # judge untouched
    moved = [k for k, v in student.recognizer.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved and any(k.endswith("weight") and "input_layer" in k for k in moved)
    assert not torch.equal(student.adapter.weight.detach().flatten(), torch.eye(3).flatten())
    assert student.training_curve["steps"] >= 2


# --------------------------------------------------------------------------- report

def test_evaluate_client_and_write_report(lfw_faces, frontend, tmp_path):
    from clients.privacy_eval import REPORT_ROWS
    from privacy.report import (
        FP_ROW,
        JUDGE_ROW,
        PERCEPTUAL_ROW,
        PIXEL_ROWS,
        PRETRAINED_STUDENT_ROW,
        STUDENT_ROW,
    )

    aux, client, labels, client_ids, aux_ids = lfw_faces
    cfg = PRIVACY_PRESETS["tiny"].with_(inverter_epochs=1, aux_images=8, eval_images=12,
                                        batch_size=4, linkage_width=8, grid_rows=3, n_boot=50,
                                        gi_images=2, gi_steps=2, gi_probe_steps=10)
    torch.manual_seed(0)
    judge = build_backbone("ir18", 3, width=8).eval()       # untrained: a judge to refuse
    f_p = build_backbone("ir18", 3, width=8).eval()         # untrained stand-in for f_p
    with pytest.raises(ValueError):
        evaluate_client(frontend, client, labels, aux, judge_embed_fn(judge), cfg,
                        client_identities=client_ids, aux_identities=client_ids[:1])
    result = evaluate_client(frontend, client, labels, aux, judge_embed_fn(judge), cfg,
                             progress=False, client_identities=client_ids,
                             aux_identities=aux_ids, gi_recognizer=f_p, judge_model=judge)
    rows = result["metrics"]
    assert set(rows) == set(REPORT_ROWS)
    assert result["curves"][PERCEPTUAL_ROW]["metric"] == "l1+perc+id"
    assert all(not p.requires_grad for p in judge.parameters())  # frozen, not trained
    # the tiny attacker cannot pass the gate: every protected pixel row is "no evidence"
    assert not result["pixel_gate"]["passed"]
    for name in PIXEL_ROWS[1:]:
        assert result["verdicts"][name].startswith("no evidence"), name
    # the untrained judge is refused; f_p needs no judge and scores different photos
    assert not result["judge_gate"]["passed"]
    assert "refused" in rows["minusface"]["identity"] and "refused" in rows[STUDENT_ROW]["identity"]
    assert "refused" in rows[PRETRAINED_STUDENT_ROW]["identity"]
    assert result["curves"][PRETRAINED_STUDENT_ROW]["metric"] == "cos_loss"
    assert rows[JUDGE_ROW]["identity"]["auc"] < cfg.judge_min_auc
    fp = rows[FP_ROW]["identity"]
    assert fp["n"] == 6 and fp["n_gallery"] == 6 and fp["chance"]["rank1"] == pytest.approx(1 / 6)
    assert 0.0 <= fp["rank1"] <= 1.0 and fp["rank1_ci"] is not None
    m = rows["minusface"]
    assert m["n"] == 12 and m["ssim_ci"][0] <= m["ssim"] <= m["ssim_ci"][1]
    assert result["curves"]["minusface"]["steps"] >= 1
    report = write_report(result, tmp_path / "client")
    data = json.loads((tmp_path / "client" / "privacy.json").read_text())
    assert "_images" not in data and data["metrics"]["minusface"]["ssim"] == m["ssim"]
    assert "_per_image" not in data["metrics"]["minusface"]
    assert data["curves"]["none"]["heldout_loss"]
    gi_rows = data["gradient_inversion"]["metrics"]
    assert {"gi/none", "gi/minusface", "gi/minusface vs X_p", "gi/minusface + inverter",
            "gi-probe/none", "reference: grey guess", "gi-steps3/none",
            "gi-steps3/minusface vs X_p"} <= set(gi_rows)
    assert "optimistic" in data["gradient_inversion"]["attacker"]
    text = report.read_text()
    assert "| minusface |" in text and "Adam lr 0.001" in text
    assert "hides appearance, not identity" in text and "target met" not in text
    assert "identity metrics refused" in text and "(0.167)" in text
    assert "## Update leakage (gradient inversion)" in text and "| gi/minusface vs X_p |" in text
    for png in ("grid.png", "grid_gi.png", "curves.png"):
        assert (tmp_path / "client" / png).is_file(), png
    summary = write_summary({"client-0": result, "client-1": result}, tmp_path)
    assert summary.read_text().count("## client-") == 2
    assert "gradient-inversion" in attacker_description(cfg.with_(gi_images=0), 8, None)["not_run"]
    from clients.privacy_eval import flatten_metrics, privacy_metric_names
    flat = flatten_metrics(result)
    assert set(flat) <= privacy_metric_names() and flat["pixel-gate-passed"] == 0
    assert f"{FP_ROW}/rank1" in flat and f"{FP_ROW}/rank1_lo" in flat
    assert "minusface/rank1" not in flat                       # refused never leaves as a number


def test_cli_parser_registers_privacy_eval():
    from minusfed.privacy_cli import add_parser
    parser = argparse.ArgumentParser(prog="minusfed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["privacy-eval", "--weights", "g.pt", "--data", "/x",
                              "--client-identities", "3", "--aux-identities", "5", "--out", "o",
                              "--preset", "tiny"])
    assert args.command == "privacy-eval" and args.client_identities == 3 and callable(args.func)


def test_combined_verdict_stands_only_when_every_seed_agrees():
    from privacy.report import combined_verdict

    assert combined_verdict(["LEAKS", "LEAKS", "LEAKS"]) == "LEAKS"
    mixed = combined_verdict(["LEAKS", "no evidence (gate failed)", "LEAKS"])
    assert mixed.startswith("no evidence (attacker seeds disagree") and "LEAKS x2" in mixed


def test_privacy_eval_with_two_attacker_seeds_scores_the_same_images(lfw_root, tmp_path, capsys):
    from minusfed.privacy_cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "privacy"
    args = parser.parse_args(["privacy-eval", "--data", str(lfw_root), "--out", str(out),
                              "--preset", "tiny", "--client-identities", "4",
                              "--judge-identities", "6", "--gi-images", "0", "--seed", "3",
                              "--attacker-seeds", "2", "--quiet"])
    assert args.func(args) == 0
    one, two = (json.loads((out / f"seed-{s}" / "privacy.json").read_text()) for s in (3, 4))
    assert (one["seed"], one["attacker_seed"], two["attacker_seed"]) == (3, 3, 4)
    assert one["n_eval_images"] == two["n_eval_images"]
    # the same faces: the blind constant guesses score identically; the attackers differ
    for row in ("constant: mean aux face", "constant: median aux face"):
        assert one["metrics"][row]["ssim"] == two["metrics"][row]["ssim"], row
    assert one["curves"]["none"]["train_loss"] != two["curves"]["none"]["train_loss"]
    summary = json.loads((out / "seeds.json").read_text())
    none = summary["rows"]["none"]["ssim"]
    assert none["values"] == [one["metrics"]["none"]["ssim"], two["metrics"]["none"]["ssim"]]
    assert none["min"] <= none["mean"] <= none["max"]
    assert summary["rows"]["minusface"]["verdict"].startswith("no evidence")
    text = (out / "seeds.md").read_text()
    assert "over 2 attacker seeds (3, 4)" in text and "| minusface |" in text
    assert "seeds.md" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--attacker-seeds"):
        args.attacker_seeds = 0
        args.func(args)
