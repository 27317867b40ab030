"""int8 f_p for CPU inference (the recognition service), with PyTorch's FX graph-mode quantization.

Why: the service spends its time in f_p's convolutions, and x86 CPUs run int8 convolutions
(AVX2, AVX512-VNNI, AMX-INT8 through fbgemm/oneDNN, PyTorch's "x86" engine) several times faster
than float32 ones.  The accuracy cost depends on the trained weights, so it is measured per
bundle (federation/service/int8_bundle.py) and the service refuses an int8 f_p that lost more
than the limit there.

Three departures from a plain `prepare_fx` / `convert_fx` (docs/service.md, "int8"):
- The embedding's BatchNorm1d has no affine parameters, which torch's Linear+BN fuser cannot
  take; it is folded into the Linear here instead (exact in eval mode).
- PReLU stays float: torch's quantized PReLU gave a cosine of 0.91 to float32 after one
  conv + PReLU on real-valued inputs, against 0.9999 for the conv alone.  PReLU is swapped for
  a subclass the quantizer does not match, so it runs in float between a dequantize and a
  quantize; the convolutions and the Linear run in int8.
- The activation ranges are data: `calibrate` returns the observers' state (plain tensors, for
  safetensors), and `build` makes the int8 model from that state, so a service needs no
  calibration images and no pickle.

torch marks its FX quantization API for migration to torchao's pt2e flow, which needs
torch.compile and a C++ compiler at run time; the FX API is what this torch ships and runs
eagerly, so its deprecation warnings are silenced here and the tests pin its behaviour.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

ENGINE = "x86"
OBSERVER_TAG = "activation_post_process"
EXAMPLE_SHAPE = (1, 3, 112, 112)


class Int8Error(ValueError):
    """An int8 model that cannot be built from the given observer state."""


class FloatPReLU(nn.PReLU):
    """A PReLU the quantizer does not match (it matches by exact type): it runs in float."""


def available() -> bool:
    """Whether this torch build has the x86 quantized engine."""
    return ENGINE in torch.backends.quantized.supported_engines


def _fold_embedding_bn(model: nn.Module) -> None:
    """Fold every Linear -> BatchNorm1d(affine=False) pair of an nn.Sequential into the Linear."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for (_, lin), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and not bn.affine:
                scale = torch.rsqrt(bn.running_var + bn.eps)
                with torch.no_grad():
                    bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
                    lin.weight.mul_(scale[:, None])
                    lin.bias = nn.Parameter((bias - bn.running_mean) * scale)
                setattr(seq, bn_name, nn.Identity())


def _float_prelus(model: nn.Module) -> None:
    for name, child in model.named_children():
        if type(child) is nn.PReLU:
            swapped = FloatPReLU(child.num_parameters)
            swapped.weight = child.weight
            setattr(model, name, swapped)
        else:
            _float_prelus(child)


def quantizable_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float copy of `model` that computes the same function, ready for FX."""
    out = copy.deepcopy(model).eval()
    _fold_embedding_bn(out)
    _float_prelus(out)
    return out


def _prepared(model: nn.Module) -> torch.fx.GraphModule:
    if not available():
        raise Int8Error(f"this torch has no {ENGINE!r} quantized engine "
                        f"(it has {', '.join(torch.backends.quantized.supported_engines)})")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(quantizable_copy(model), get_default_qconfig_mapping(ENGINE),
                          (torch.zeros(EXAMPLE_SHAPE),))


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run X_p batches through `model` with observers; their state (activation ranges and
    histograms) is what `build` needs."""
    prepared = _prepared(model)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            prepared(batch.float())
            seen += len(batch)
    if not seen:
        raise Int8Error("calibrate: no calibration images")
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if OBSERVER_TAG in k}


def build(model: nn.Module, observers: Mapping[str, torch.Tensor]) -> nn.Module:
    """The int8 model of `model` (float f_p) from `calibrate`'s observer state."""
    prepared = _prepared(model)
    expected = {k: v for k, v in prepared.state_dict().items() if OBSERVER_TAG in k}
    missing, extra = sorted(set(expected) - set(observers)), sorted(set(observers) - set(expected))
    if missing or extra:
        raise Int8Error(f"observer state does not fit this f_p: missing {missing[:3]}, "
                        f"unexpected {extra[:3]} (calibrated for another architecture or torch)")
    for key, value in observers.items():
        if value.shape != expected[key].shape:
            raise Int8Error(f"observer {key!r}: shape {tuple(value.shape)}, expected "
                            f"{tuple(expected[key].shape)}")
        if value.is_floating_point() and key.endswith(("min_val", "max_val")) \
                and not bool(torch.isfinite(value).all()):
            raise Int8Error(f"observer {key!r} saw no data (its range is not finite)")
    prepared.load_state_dict(dict(observers), strict=False)
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared).eval()
