"""Pooled stage 2 (run config stage2-mode = "pooled"): the sites ship X_p, the server trains f_p.

After stage 1 the server asks every site, chunk by chunk, for its training faces protected with
the frozen global g ("query.pooled_upload", clients/upload.py): each face `protect-copies` times
with fresh permutations, float16, with the site's pseudonymous label tokens.  Every reply passes
the site's outbound guard (only registered protect() outputs and issued tokens leave) and the
server's screening (`strategy.spool.check_upload`); accepted chunks go to the spool on disk once.
Waves of one message per site go out until every site's chunks are spooled; a site whose
reply fails is asked again (`MAX_TRIES` failures in a row drop it, with a warning, and its data is
not used).  A restarted ServerApp finds the spool and asks only for missing chunks (chunk 0 is
asked again to learn which site a node is: its answer is discarded if already spooled).

Then `strategy.pooled_train` trains f_p and the server's margin head over every (site, token)
class on Ray Train, and f_p goes back to the sites for federated evaluation (Flower "evaluate"
messages, as in federated mode).  metrics.jsonl gets one "stage2-upload" line per site: what
left it (faces, copies, X_p, label tokens, bytes) and what it received.

What the server learns here that it does not learn in federated mode: which X_p share an
identity within a site (the label tokens), and the X_p themselves.  What it costs the sites:
protecting and uploading their faces once instead of training f_p for every stage-2 round.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from minusface.presets import Preset
from strategy.checkpoint import CheckpointStore
from strategy.pooled_train import PooledJob, run_pooled_training
from strategy.spool import SiteUploads, Spool, UploadError, check_upload, site_name
from task.config import RunConfig
from task.records import (
    ARRAYS,
    CONFIG,
    FROZEN_GENERATOR,
    NUM_EXAMPLES,
    PROTECTED,
    PROTECTED_KEY,
    PSEUDONYMS,
    PSEUDONYMS_KEY,
    STAGE2,
    UPLOAD_MESSAGE_TYPE,
    UPLOAD_RECORD,
)
from task.wire import to_wire

MAX_TRIES = 3                  # failed replies in a row before a site is dropped
UPLOAD_LINE = "stage2-upload"
EVALUATE_KEYS = ("accuracy", "auc", "tar_at_far_1e-2")


def pooled_folder(out_dir: Path) -> Path:
    return Path(out_dir) / "pooled"


def upload_id(folder: Path) -> str:
    """This run's upload id (made once, kept in the folder): a site keys its tokens by it, so a
    restarted ServerApp and a restarted SuperNode agree on the labels of the remaining chunks."""
    path = folder / "upload-id"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    folder.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(8)
    path.write_text(value, encoding="utf-8")
    return value


@dataclass
class NodeUpload:
    """The server's view of one node's upload."""

    node: int
    site: str | None = None
    chunks: int | None = None
    pending: list[int] = field(default_factory=lambda: [0])
    failures: int = 0
    refused: int = 0
    messages: int = 0
    bytes_sent: int = 0            # by the site (its replies)
    bytes_received: int = 0        # by the site (our messages)
    dropped: str = ""


def array_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ArrayRecord's arrays (what goes over the wire)."""
    return sum(len(a.data) for a in record.values())


def _screen(reply: Message, want: NodeUpload, chunk: int, cfg: RunConfig):
    content = reply.content
    try:
        xp = content[PROTECTED][PROTECTED_KEY].numpy()
        labels = content[PSEUDONYMS][PSEUDONYMS_KEY].numpy()
        said = dict(content[UPLOAD_RECORD])
    except Exception as e:  # noqa: BLE001 - whatever a hostile reply holds, it is refused
        raise UploadError(f"reply lacks a readable {PROTECTED}/{PSEUDONYMS}/{UPLOAD_RECORD} "
                          f"({type(e).__name__})") from None
    return check_upload(xp, labels, said, chunk=chunk, chunk_images=cfg.upload_chunk_images,
                        copies=cfg.protect_copies, max_images=cfg.max_num_examples,
                        known_chunks=want.chunks)


def _node_name(node: int) -> str:
    return f"node-{node}"


def collect_uploads(grid: Grid, folder: Path, generator: Mapping[str, torch.Tensor],
                    cfg: RunConfig, store: CheckpointStore,
                    site_names: Callable[[int], str] = _node_name) -> list[SiteUploads]:
    """Spool every site's upload; returns the sites whose whole upload is on disk."""
    spool = Spool(folder / "spool")
    uid = upload_id(folder)
    g = ArrayRecord(to_wire(generator, cfg.wire_dtype))
    g_bytes = array_bytes(g)
    nodes = {int(n): NodeUpload(int(n)) for n in sorted(grid.get_node_ids())}
    t0 = time.perf_counter()
    while True:
        asking = {n: u for n, u in nodes.items() if u.pending and not u.dropped}
        if not asking:
            break
        messages = []
        for n, u in asking.items():
            conf = ConfigRecord({"upload-id": uid, "chunk": u.pending[0],
                                 "chunk-images": cfg.upload_chunk_images,
                                 "copies": cfg.protect_copies, "stage": STAGE2})
            messages.append(Message(RecordDict({FROZEN_GENERATOR: g, CONFIG: conf}), dst_node_id=n,
                                    message_type=UPLOAD_MESSAGE_TYPE, group_id=f"upload-{uid}"))
            u.messages += 1
            u.bytes_received += g_bytes
        replies = {int(r.metadata.src_node_id): r
                   for r in grid.send_and_receive(messages, timeout=cfg.round_timeout)}
        for n, u in asking.items():
            chunk = u.pending[0]
            reply = replies.get(n)
            problem = ""
            if reply is None:
                problem = "no reply"
            elif reply.has_error():
                problem = f"error reply (code {reply.error.code})"
            else:
                try:
                    upload = _screen(reply, u, chunk, cfg)
                    owner = next((o for o in nodes.values()
                                  if o is not u and o.site == upload.site and not o.dropped), None)
                    if owner is not None or (u.site is not None and u.site != upload.site):
                        raise UploadError(f"site token {upload.site} already belongs to another "
                                          "node, or this node changed its token")
                except UploadError as e:
                    problem = f"refused: {e}"
                    u.refused += 1
            if problem:
                u.failures += 1
                log(WARNING, "minusfed: upload of node %d chunk %d: %s (%d/%d)", n, chunk,
                    problem, u.failures, MAX_TRIES)
                if u.failures >= MAX_TRIES:
                    u.dropped = problem
                    log(WARNING, "minusfed: node %d dropped from pooled stage 2 after %d failed "
                        "replies; its faces are not used", n, u.failures)
                continue
            u.failures = 0
            u.bytes_sent += (array_bytes(reply.content[PROTECTED])
                             + array_bytes(reply.content[PSEUDONYMS]))
            spool.put(upload, n)
            if u.site is None:
                u.site, u.chunks = upload.site, upload.chunks
                u.pending = [c for c in range(upload.chunks) if not spool.has(upload.site, c)]
            else:
                u.pending = [c for c in u.pending if c != chunk]
        done = sum(1 for u in nodes.values() if u.site and not u.pending)
        log(INFO, "minusfed: pooled upload, %d of %d site(s) complete, %d chunk(s) to go, "
            "%.0f s", done, len(nodes), sum(len(u.pending) for u in nodes.values()
                                            if not u.dropped), time.perf_counter() - t0)
    held = spool.sites()
    complete = []
    for u in nodes.values():
        s = held.get(u.site) if u.site else None
        record = {"stage": UPLOAD_LINE, "node": u.node, "site_name": site_names(u.node),
                  "site": u.site,
                  "complete": bool(s and s.complete and not u.dropped), "dropped": u.dropped,
                  "messages": u.messages, "refused": u.refused,
                  "bytes_sent_this_run": u.bytes_sent, "bytes_received": u.bytes_received}
        if s is not None:
            record.update({"faces": s.images, "copies": s.copies, "xp_images": s.xp_images,
                           "label_tokens": s.identities, "chunks": s.chunks,
                           "spooled_bytes": s.nbytes})
            if record["complete"]:
                complete.append(s)
        store.append_metrics(record)
    return complete


def _check_tokens(spool_root: Path, sites: list[SiteUploads]) -> int:
    """Label tokens found at more than one site (0 expected: sites draw independently)."""
    seen: dict[int, str] = {}
    shared = 0
    spool = Spool(spool_root)
    for s in sites:
        tokens = set()
        for _, labels in spool.chunk_files(s.site):
            tokens.update(np.load(labels, allow_pickle=False).tolist())
        for t in tokens:
            shared += t in seen
            seen[t] = s.site
    return shared


def federated_evaluate(grid: Grid, recognizer: Mapping[str, torch.Tensor],
                       generator: Mapping[str, torch.Tensor], cfg: RunConfig,
                       index: int) -> dict[str, float]:
    """f_p back to the sites: "evaluate" on their held-out pairs, means weighted by pairs."""
    content = RecordDict({ARRAYS: ArrayRecord(to_wire(recognizer, cfg.wire_dtype)),
                          FROZEN_GENERATOR: ArrayRecord(to_wire(generator, cfg.wire_dtype)),
                          CONFIG: ConfigRecord({"stage": STAGE2, "minusfed-round": index})})
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content, dst_node_id=int(n), message_type="evaluate",
                        group_id=f"pooled-evaluate-{index}") for n in nodes]
    accepted: list[RecordDict] = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error() or "metrics" not in reply.content:
            continue
        m = dict(reply.content["metrics"])
        n = m.get(NUM_EXAMPLES)
        values = {k: m.get(k) for k in EVALUATE_KEYS}
        if (isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= cfg.max_num_examples
                or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1
                           for v in values.values())):
            continue                                # screened out, as in federated rounds
        accepted.append(RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: n, **values})}))
    # Flower's own example-weighted mean, as FedAvg gives federated rounds
    out: dict[str, float] = ({f"clients_evaluate_{k}": float(v) for k, v in
                              aggregate_metricrecords(accepted, NUM_EXAMPLES).items()}
                             if accepted else {})
    out["clients_evaluate_replied"] = len(accepted)
    return out


def _save_initial(folder: Path, initial: Mapping[str, torch.Tensor]) -> str:
    """The starting f_p as a safetensors file the training process reads (no pickle)."""
    from safetensors.torch import save_file

    path = folder / "init_recognizer.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k.removeprefix("recognizer."): v.contiguous() for k, v in initial.items()},
              str(path))
    return str(path)


def run_pooled_stage2(grid: Grid, out_dir: Path, cfg: RunConfig, preset: Preset,
                      generator: Mapping[str, torch.Tensor], store: CheckpointStore, index: int,
                      on_epoch: Callable[[dict], None] | None = None,
                      site_names: Callable[[int], str] = _node_name,
                      initial: Mapping[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Uploads, Ray Train, federated evaluation; returns (f_p as "recognizer.*", metrics).
    `initial` ("recognizer.*"): the f_p training starts from (init-bundle), else a fresh one."""
    folder = pooled_folder(out_dir)
    t0 = time.perf_counter()
    sites = collect_uploads(grid, folder, generator, cfg, store, site_names)
    upload_seconds = time.perf_counter() - t0
    if not sites:
        raise RuntimeError("pooled stage 2: no site completed its upload (see the "
                           f"'{UPLOAD_LINE}' lines in {store.metrics_path})")
    shared = _check_tokens(folder / "spool", sites)
    if shared:
        log(WARNING, "minusfed: %d label token(s) appear at two sites; classes are keyed by "
            "site and token, so they stay apart", shared)
    epochs = cfg.pooled_epochs or cfg.stage2_rounds * cfg.local_epochs
    job = PooledJob(spool=str(folder / "spool"), sites=sorted(s.site for s in sites),
                    preset=preset.to_dict(), epochs=epochs, seed=cfg.seed + 1,
                    workers=cfg.pooled_workers, gpus_per_worker=cfg.pooled_gpus_per_worker,
                    folder=str(folder), cpu_precision=cfg.cpu_precision,
                    init_recognizer=_save_initial(folder, initial) if initial else "")
    log(INFO, "minusfed: pooled stage 2: %d X_p of %d site(s), %d epoch(s) on Ray Train with %d "
        "worker(s)", sum(s.xp_images for s in sites), len(sites), epochs, cfg.pooled_workers)
    t1 = time.perf_counter()
    recognizer = run_pooled_training(job, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - t1
    state = {f"recognizer.{k}": v for k, v in recognizer.items()}
    metrics: dict[str, float] = {
        "pooled_sites": len(sites), "pooled_xp_images": sum(s.xp_images for s in sites),
        "pooled_epochs": epochs, "pooled_upload_seconds": upload_seconds,
        "pooled_train_seconds": train_seconds, "pooled_shared_tokens": shared}
    if cfg.fraction_evaluate > 0:
        metrics.update(federated_evaluate(grid, state, generator, cfg, index))
    return state, metrics


__all__ = ["array_bytes", "collect_uploads", "federated_evaluate", "pooled_folder",
           "run_pooled_stage2", "site_name", "upload_id"]
