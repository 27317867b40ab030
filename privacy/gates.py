"""Gates: when an attack row may count as evidence, and the one-line verdict it gets.

A failed attack is not protection.  So:

* pixel rows (inverters on a view) count only when the SAME attacker (architecture, budget,
  data) recovers UNPROTECTED faces well (row "none" >= the preset's gate_psnr dB AND
  >= gate_ssim SSIM) and beats the best constant guess (the better of the mean and the median
  auxiliary face, on PSNR and on SSIM).  Otherwise every pixel row reads "no evidence".
* judge-scored identity metrics count only when the judge itself recognises DIFFERENT photos of
  the evaluated people (its cross-image AUC >= judge_min_auc); otherwise they are refused.
* the f_p linkage has no judge: the global recognizer is the attacker; it needs only enough
  identities (privacy.identity.MIN_IDENTITIES).

"target met" is only ever written by `pixel_verdict` for a row whose gate passed.
"""

from __future__ import annotations

from collections.abc import Mapping

CONSTANT_ROWS = ("constant: mean aux face", "constant: median aux face")
PIXEL_TARGETS = {"ssim": 0.50, "psnr": 12.0}     # the paper's recovery targets (docs/method.md)


def best_constant(rows: Mapping[str, Mapping]) -> dict[str, float]:
    """The best constant guess on each pixel metric (higher = closer to the faces)."""
    out = {}
    for k in ("ssim", "psnr"):
        vals = [rows[r][k] for r in CONSTANT_ROWS if r in rows and rows[r].get(k) is not None]
        if vals:
            out[k] = max(vals)
    return out


def pixel_gate(rows: Mapping[str, Mapping], gate_psnr: float, gate_ssim: float) -> dict:
    """Does the unprotected control ("none") show the attacker works?  {"passed", "reason"}."""
    none = rows.get("none") or {}
    const = best_constant(rows)
    if none.get("psnr") is None or none.get("ssim") is None or len(const) < 2:
        return {"passed": False, "reason": "gate failed: no 'none' control or no constant guess"}
    fails = []
    if none["psnr"] < gate_psnr:
        fails.append(f"PSNR {none['psnr']:.2f} < {gate_psnr:g} dB")
    if none["ssim"] < gate_ssim:
        fails.append(f"SSIM {none['ssim']:.3f} < {gate_ssim:g}")
    if none["psnr"] <= const["psnr"] or none["ssim"] <= const["ssim"]:
        fails.append(f"not above the best constant guess ({const['psnr']:.2f} dB / SSIM "
                     f"{const['ssim']:.3f})")
    reached = f"the attacker reaches {none['psnr']:.2f} dB / SSIM {none['ssim']:.3f} on " \
              f"unprotected faces (gate: >= {gate_psnr:g} dB and >= {gate_ssim:g})"
    if fails:
        return {"passed": False, "reason": f"gate failed: {reached}; " + "; ".join(fails)}
    return {"passed": True, "reason": f"gate passed: {reached}, above the best constant guess"}


def pixel_verdict(row: str, m: Mapping, gate: Mapping, const: Mapping[str, float]) -> str:
    """Verdict of one pixel row (not the "none" control itself)."""
    if row == "none":
        return "control: gate " + ("passed" if gate["passed"] else "failed")
    if not gate["passed"]:
        return "no evidence (gate failed)"
    if m.get("psnr") is None or m.get("ssim") is None:
        return "not measured"
    above = m["psnr"] > const["psnr"] or m["ssim"] > const["ssim"]
    if above:
        return (f"leaks: recovery above the best constant guess ({m['psnr']:.2f} dB vs "
                f"{const['psnr']:.2f}, SSIM {m['ssim']:.3f} vs {const['ssim']:.3f})")
    met = m["ssim"] <= PIXEL_TARGETS["ssim"] and m["psnr"] <= PIXEL_TARGETS["psnr"]
    return ("no better than the best constant guess; recovery target (SSIM <= 0.50, PSNR <= 12 "
            "dB) " + ("met" if met else "not met"))


def judge_gate(judge_row: Mapping | None, min_auc: float) -> dict:
    """May judge-scored identity metrics be shown?  Uses the judge's own cross-image AUC."""
    if not judge_row or judge_row.get("suppressed"):
        why = (judge_row or {}).get("suppressed", "judge quality unknown")
        return {"passed": False, "reason": f"identity metrics suppressed: {why}"}
    auc, tar = judge_row.get("auc"), judge_row.get("tar@0.001")
    quality = f"judge cross-image AUC {auc:.3f}, TAR@1e-3 " + \
              ("n/a" if tar is None else f"{tar:.3f}")
    if auc < min_auc:
        return {"passed": False, "reason": f"identity metrics refused: {quality} < required "
                                           f"AUC {min_auc:g}", "quality": quality}
    return {"passed": True, "reason": quality, "quality": quality}
