"""f_p embedding on the CPU: float32, the CPU precision policy's float choice, and int8.

    python -m bench.int8 [--models ir18:16,ir50:64] [--batches 1,8,32] [--iters 5]
                         [--bundle DIR]

Side by side in one process, alternating call by call (median ms per image): float32 NCHW
(autocast off), the float path the recognition service runs (`embed_context`: float32, or bf16
where the probe measured a win on this CPU), and the int8 model `minusfed serve --int8` builds
(minusface/int8.py), calibrated on X_p of real LFW faces through a fresh g.  Speed does not
depend on training, so the weights are fresh; the embedding cosine of int8 to float32 on held-out
X_p is printed as a sanity check only.  Accuracy is a property of a trained bundle: `--bundle`
prints what `minusfed bundle int8` measured for it (server/int8.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (
    arg_parser,
    command_line,
    data_path,
    markdown_table,
    provenance,
    result_record,
)


def _faces(lfw: Path, n: int) -> torch.Tensor:
    from clients.data import FaceDataset
    from clients.recognition_client import face_files

    files = face_files([lfw / "images"])[:n]
    return torch.cat(list(FaceDataset([(f, 0) for f in files], progress=False).batches(64)))


def _time(model: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor, iters: int) -> dict:
    """Median ms per call of float32, the service's float path and int8, alternating."""
    from minusface import precision

    def run_float32() -> None:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            model(x)

    def run_policy() -> None:                  # what federation.service.model.Embedder does
        context, model_fn = precision.embed_context(model, len(x))
        with torch.no_grad(), context:
            model_fn(x)

    def run_int8() -> None:
        with torch.no_grad():
            q(x)
    return precision.time_alternating({"float32": run_float32, "policy": run_policy,
                                       "int8": run_int8}, iters=iters, warmup=1)


def main(argv: list[str] | None = None) -> None:
    p = arg_parser("bench.int8", __doc__)
    p.add_argument("--models", default="ir18:16,ir50:64", help="backbone:width,...")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--calibration", type=int, default=64, help="faces (x2 views) to calibrate on")
    p.add_argument("--data", help="LFW folder (default $MINUSFED_DATA)")
    p.add_argument("--bundle", help="also print this bundle's server/int8.json measurement")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from minusface import int8, precision
    from minusface.backbones import build_backbone
    from minusface.frontend import MinusFaceFrontend
    from minusface.generator import UNetGenerator

    torch.manual_seed(0)
    faces = _faces(data_path(args.data), args.calibration + 32)
    frontend = MinusFaceFrontend(generator=UNetGenerator(width=8)).eval()
    with torch.no_grad():                  # (N, 2, 3, 112, 112): face and mirror views
        xp = torch.cat([torch.stack([frontend.protect(v, register=False)
                                     for v in (x, torch.flip(x, dims=(3,)))], dim=1)
                        for x in faces.split(32)])
    held, cal = xp[:32].flatten(0, 1)[:32], xp[32:].flatten(0, 1)      # different faces
    print(f"# {provenance()}\n# {command_line('bench.int8', argv)}")
    rows, results = [], []
    for spec in args.models.split(","):
        name, width = spec.split(":")
        model = build_backbone(name, 3, width=int(width)).eval()
        q = int8.build(model, int8.calibrate(model, (cal[i:i + 32] for i in range(0, len(cal), 32))))
        with torch.no_grad():
            cos = F.cosine_similarity(q(held), model(held))
        for batch in (int(b) for b in args.batches.split(",")):
            x = held[:batch] if batch <= len(held) else held.repeat(batch // len(held) + 1, 1, 1, 1)[:batch]
            chosen = precision.inference_plan("embed", model, max(1, min(batch, 32))).choice
            ms = _time(model, q, x, args.iters)
            per = {k: v / batch for k, v in ms.items()}
            results.append({"model": spec, "batch": batch, "ms_per_image": per,
                            "policy_choice": chosen, "cosine_min": float(cos.min()),
                            "cosine_median": float(cos.median())})
            rows.append([f"{name} w{width}", batch, f"{per['float32']:.2f}",
                         f"{per['policy']:.2f} ({chosen})", f"{per['int8']:.2f}",
                         f"{per['float32'] / per['int8']:.2f}x",
                         f"{per['policy'] / per['int8']:.2f}x", f"{float(cos.min()):.4f}"])
            print(rows[-1], flush=True)
    print(markdown_table(["f_p", "batch", "float32 ms/img", "service float path ms/img (choice)",
                          "int8 ms/img", "int8 vs float32", "int8 vs float path",
                          "cosine int8-float32 (min, fresh weights)"], rows))
    if args.bundle:
        info = json.loads((Path(args.bundle) / "server" / "int8.json").read_text())
        print(json.dumps(info["evaluation"], indent=2))
    if args.json:
        record = result_record(command_line("bench.int8", argv),
                               "ms per image of f_p embedding, float32 NCHW vs the policy's float "
                               "path vs int8 (FX static quantization), fresh weights, X_p of LFW "
                               "faces", {"results": results, "rows": headline_rows(results)})
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


def headline_rows(results: list[dict]) -> list[dict]:
    """The README rows: int8 against both float paths at the largest batch of each model."""
    rows = []
    for spec in dict.fromkeys(r["model"] for r in results):
        r = max((r for r in results if r["model"] == spec), key=lambda r: r["batch"])
        ms = r["ms_per_image"]
        rows.append({"section": "speed",
                     "measurement": (f"f_p {spec} int8 embed, batch {r['batch']}: ms/img vs float32 "
                                     f"and the float path ({r['policy_choice']}); cosine min"),
                     "value": (f"{ms['int8']:.2f} vs {ms['float32']:.2f} and {ms['policy']:.2f} "
                               f"({ms['float32'] / ms['int8']:.1f}x, {ms['policy'] / ms['int8']:.1f}x); "
                               f"{r['cosine_min']:.3f}")})
    return rows


if __name__ == "__main__":
    main()
