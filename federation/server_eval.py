"""Server-side evaluation of the global model on a public benchmark no client holds.

The LFW View 2 fold `eval-fold` is excluded from every site's identities, so its pairs are a
held-out public benchmark.  In stage 1 the global f is scored on residues from the global g; in
stage 2 every image (and separately its flip) is protected with the global g exactly as a client
would, then embedded by the global f_p.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from clients.data import FaceDataset, pair_index, read_pairs
from minusface.eval import embed, pair_scores, verification_metrics
from minusface.precision import embed_context
from minusface.presets import Preset
from minusface.trainer import build_models
from task.config import RunConfig, resolve_data_path
from task.models import generator_from_arrays
from task.records import STAGE1
from task.wire import load_shared


class ServerEvaluator:
    def __init__(self, lfw_root: Path, fold: int, max_pairs: int = 0) -> None:
        pairs = [p for p in read_pairs(Path(lfw_root) / "pairs.txt") if p.fold == fold]
        if not pairs:
            raise ValueError(f"eval-fold {fold}: no pairs in {lfw_root}/pairs.txt")
        if max_pairs and max_pairs < len(pairs):
            same = [p for p in pairs if p.same][: max_pairs // 2]
            diff = [p for p in pairs if not p.same][: max_pairs - len(same)]
            pairs = same + diff
        paths, self.idx_a, self.idx_b = pair_index(pairs)
        self.same = np.array([p.same for p in pairs])
        self.folds = np.arange(len(pairs)) % 10
        ds = FaceDataset([(p, 0) for p in paths], skip_errors=False, progress=False)
        self.faces = torch.cat(list(ds.batches(256)))
        self.num_pairs = len(pairs)
        # the last call's cosine score per pair (None when it had no finite embeddings): the
        # run report draws its ROC curve from them
        self.last_scores: np.ndarray | None = None

    def __call__(self, stage: str, preset: Preset, shared: dict[str, torch.Tensor],
                 frozen_generator: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        generator = generator_from_arrays(shared if stage == STAGE1 else frozen_generator)
        recipe = "stage1" if stage == STAGE1 else "stage2"
        models = build_models(recipe, preset, num_classes=2, generator=generator)
        load_shared({"recognizer": models.recognizer}, shared)
        self.last_scores = None
        try:
            # evaluate_verification's steps, keeping the scores
            context, model_fn = embed_context(models.recognizer, 64)   # CPU precision policy
            with context:
                emb = embed(model_fn, self.faces, transform=models.transform(),
                            batch_size=64, flip=True, device=torch.device("cpu"))
            scores = pair_scores(emb[self.idx_a], emb[self.idx_b])
            m = verification_metrics(scores, self.same.astype(bool), n_folds=10, folds=self.folds)
            self.last_scores = scores
        except ValueError as exc:    # non-finite embeddings, e.g. a model swamped by DP noise
            if "NaN or infinite" not in str(exc):
                raise
            nan = float("nan")
            m = {"accuracy": nan, "accuracy_std": nan, "auc": nan,
                 "tar_at_far": {0.01: {"tar": nan}, 0.001: {"tar": nan}}}
        return {"server_accuracy": m["accuracy"], "server_accuracy_std": m["accuracy_std"],
                "server_auc": m["auc"], "server_tar_at_far_1e-2": m["tar_at_far"][0.01]["tar"],
                "server_tar_at_far_1e-3": m["tar_at_far"][0.001]["tar"],
                "server_eval_pairs": self.num_pairs}


class NoServerBenchmark:
    """A run without the server-side benchmark: no LFW folder at the server (a deployment whose
    operator holds none).  Rounds then carry no server_* metrics."""

    last_scores = None
    same = None

    def __call__(self, *args: object, **kwargs: object) -> dict[str, float]:
        return {}


def server_evaluator(cfg: RunConfig) -> tuple[ServerEvaluator | NoServerBenchmark, Path | None]:
    """The server-side benchmark of this run and its LFW folder; without one (run config
    data-path unset and no LFW at $MINUSFED_DATA or the default place) the run goes on without
    it, with a warning.  A data-path the run config names but that is not there is an error."""
    try:
        path = resolve_data_path(cfg.data_path)
    except FileNotFoundError as e:
        if cfg.data_path:
            raise
        log(WARNING, "minusfed: no server-side benchmark (%s). Rounds are scored by the sites' "
            "own evaluation only; to score the global model on held-out LFW pairs after every "
            "round, set run config data-path to an LFW folder (lfw_112_centercrop layout, "
            "README 'Data').", e)
        return NoServerBenchmark(), None
    return ServerEvaluator(path, cfg.eval_fold, cfg.server_eval_pairs), path
