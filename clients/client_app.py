"""Flower ClientApp of a site: thin translation between Flower records and `clients.local`.

Every reply passes the outbound guard (only the shared weights received, numeric metrics and
protect() outputs may leave).  The private margin head lives in `context.state` between rounds
and in an owner-only file in the site's `state-dir` (clients/site_state.py), so a restarted
SuperNode goes on with it; it never appears in any message.  Raw faces are cached only in the
site's own `cache-dir`.
Message type "evaluate.privacy" (`privacy_evaluate`): the site attacks its own faces with the
global g and replies with numbers only (clients/privacy_eval.py, federation/privacy_round.py).
Message type "query.pooled_upload" (`pooled_upload`, stage2-mode "pooled"): one chunk of the
site's training faces protected with the global g, as float16 X_p with pseudonymous labels
(clients/upload.py, federation/pooled.py).
"""

from __future__ import annotations

import hashlib
import time
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients.dp import dp_clipping_mod
from clients.faults import inject_fault, inject_handler_bug
from clients.guard import outbound_guard
from clients.local import local_evaluate, local_train, stage_models
from clients.privacy_eval import privacy_config, site_privacy_metrics
from clients.pseudonyms import SitePseudonyms, site_pseudonyms
from clients.site import SiteData, federation_identities, load_site, site_identities_from_folder
from clients.site_state import cache_dir, head_file, load_head, save_head, site_name, state_dir
from clients.upload import upload_chunk
from minusface.precision import configure as configure_precision
from privacy.report import privacy_preset_for
from simulation.partition import partition_for_client
from task.config import RunConfig, resolve_data_path, run_config
from task.models import site_seed
from task.records import (
    ARRAYS,
    CONFIG,
    FROZEN_GENERATOR,
    PRIVACY_ACTION,
    PRIVACY_RECORD,
    PROTECTED,
    PROTECTED_KEY,
    PSEUDONYMS,
    PSEUDONYMS_KEY,
    SITE_INFO_ACTION,
    SITE_NAME_KEY,
    SITE_RECORD,
    STAGE2,
    UPLOAD_ACTION,
    UPLOAD_RECORD,
)
from task.wire import like_received, unflatten

app = ClientApp()
# node config: "refuse" (anything but "allow") and this site never ships X_p in pooled stage 2
POOLED_UPLOAD_KEY = "pooled-upload"


def _site(context: Context) -> tuple[SiteData, str]:
    """The site's data: its own folder (deployment) or its partition of LFW (simulation), and the
    tag that names the site in its cache and head files.  The cache folder is the site's choice
    alone (clients.site_state), never the server's out-dir."""
    cfg = run_config(context.run_config)
    node = context.node_config
    preset = cfg.preset()
    if "data-path" in node:                          # a real site: its own folder
        root = resolve_data_path(str(node["data-path"]))
        ids = site_identities_from_folder(root, preset)
        tag = f"site-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}"   # same after restart
    else:
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
        root = resolve_data_path(cfg.data_path)
        all_ids = federation_identities(root, cfg.eval_fold, preset, cfg.max_identities)
        names = partition_for_client({k: len(v) for k, v in all_ids.items()}, n, pid,
                                     scheme=cfg.partition_scheme, seed=cfg.partition_seed)
        ids = {k: all_ids[k] for k in names}
        tag = f"lfw-fold{cfg.eval_fold}-part{pid}of{n}"
    return load_site(ids, cache_dir(node), tag), tag


def _partition_id(context: Context) -> int:
    """This site's partition (simulation); 0 for a real site with its own folder."""
    return int(context.node_config.get("partition-id", 0))


def _stage_round(conf: ConfigRecord, cfg: RunConfig, stage: str) -> int:
    """Round within the stage (0 when the server did not say): stage 2 counts after stage 1."""
    index = int(conf.get("minusfed-round", 0))
    return index - cfg.stage1_rounds if stage == STAGE2 and index else index


def _stored_head(context: Context, stage: str, path: Path | None) -> tuple[dict | None, str]:
    """The site's head for `stage` and where it came from: this SuperNode's memory, else its
    head file (a restarted SuperNode), else none."""
    name = f"head-{stage}"
    if name in context.state:
        return context.state[name].to_torch_state_dict(), "context.state"
    head = load_head(path) if path is not None else None
    return head, str(path)


def _models(msg: Message, context: Context, site: SiteData, tag: str, training: bool = False):
    cfg = run_config(context.run_config)
    configure_precision(cfg.cpu_precision)          # this machine's $MINUSFED_CPU_PRECISION wins
    conf = msg.content[CONFIG]
    stage = str(conf["stage"])
    preset = cfg.preset()
    folder = state_dir(context.node_config)
    path = head_file(folder, context.run_id, tag, stage) if folder is not None else None
    head, source = _stored_head(context, stage, path)
    refused: list[str] = []

    def fresh_head(problem: str) -> None:
        refused.append(problem)
        log(WARNING, "margin head from %s does not fit this site (%s); starting a fresh head",
            source, problem)

    frozen = (msg.content[FROZEN_GENERATOR].to_torch_state_dict()
              if FROZEN_GENERATOR in msg.content else None)
    shared = msg.content[ARRAYS].to_torch_state_dict()
    seed = site_seed(cfg.seed, _partition_id(context))
    models = stage_models(stage, preset, site.num_classes, shared, frozen, head, seed,
                          on_bad_head=fresh_head)
    stage_round = _stage_round(conf, cfg, stage)
    if training and (head is None or refused) and stage_round > 1:
        log(WARNING, "site %s: no margin head for %s round %d (none in memory or at %s): the "
            "head restarts from scratch mid-training", tag, stage, stage_round, path or
            "state-dir off")
    return stage, preset, models, seed, path


# inject_fault / inject_handler_bug: TEST HOOKS (clients/faults.py), active only with a `fault` key
# in this SuperNode's own --node-config.  inject_fault is outermost (a hostile site: it corrupts the
# reply after the guard); inject_handler_bug sits inside the guard (a buggy handler it must stop)
# DP clipping runs last (a no-op when DP is off)
@app.train(mods=[inject_fault, outbound_guard, inject_handler_bug, dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    site, tag = _site(context)
    stage, preset, models, _, head_path = _models(msg, context, site, tag, training=True)
    conf = msg.content[CONFIG]
    seed = site_seed(run_config(context.run_config).seed, _partition_id(context),
                     int(conf.get("minusfed-round", 0)))      # a new batch order every round
    shared, head, metrics = local_train(
        models, stage, site, preset, lr=float(conf["lr"]), epochs=int(conf["local-epochs"]),
        seed=seed)
    context.state[f"head-{stage}"] = ArrayRecord(head)        # private: stays on the site
    if head_path is not None:
        save_head(head_path, head)                            # owner-only file: survives a restart
    metrics["client_seconds"] = time.perf_counter() - t0      # whole handler: data, build, train
    shared = like_received(shared, {k: str(a.dtype) for k, a in msg.content[ARRAYS].items()})
    return Message(RecordDict({ARRAYS: ArrayRecord(shared), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate(mods=[outbound_guard])
def evaluate(msg: Message, context: Context) -> Message:
    site, tag = _site(context)
    _, _, models, _, _ = _models(msg, context, site, tag)
    metrics = local_evaluate(models, site)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate(PRIVACY_ACTION, mods=[outbound_guard])
def privacy_evaluate(msg: Message, context: Context) -> Message:
    """Message type "evaluate.privacy": every privacy attack on this site's own faces with the
    global frozen g (and f_p under "arrays", if sent); the reply is ONE MetricRecord of numbers
    (see clients.privacy_eval for the attacker-aux / evaluated split of the site's identities)."""
    site, _ = _site(context)
    cfg = run_config(context.run_config)
    conf = msg.content[CONFIG] if CONFIG in msg.content else ConfigRecord()
    config = privacy_config(str(conf.get("privacy-preset", privacy_preset_for(cfg.preset_name))),
                            dict(conf))
    generator = msg.content[FROZEN_GENERATOR].to_torch_state_dict()      # keys "generator.*"
    recognizer = (unflatten(msg.content[ARRAYS].to_torch_state_dict(), "recognizer")
                  if ARRAYS in msg.content else None) or None
    seed = site_seed(int(conf.get("seed", cfg.seed)), _partition_id(context))
    metrics = site_privacy_metrics(site.train.images, site.train.labels, generator, config,
                                   seed=seed, recognizer_state=recognizer,
                                   recognizer_preset=cfg.preset())
    return Message(RecordDict({PRIVACY_RECORD: MetricRecord(metrics)}), reply_to=msg)


def _pseudonym_key(conf: ConfigRecord) -> str:
    return f"pseudonyms-{conf['upload-id']}"


def _held_pseudonyms(context: Context, conf: ConfigRecord) -> SitePseudonyms | None:
    """The tokens this SuperNode drew for the upload, from its context state (a deployed
    SuperNode runs each message in a fresh ClientApp process)."""
    key = _pseudonym_key(conf)
    if key not in context.state:
        return None
    record = context.state[key]
    return SitePseudonyms(int(record["site-token"].numpy()[0]),
                          record["labels"].numpy().astype(np.int64))


@app.query(UPLOAD_ACTION, mods=[outbound_guard])
def pooled_upload(msg: Message, context: Context) -> Message:
    """Message type "query.pooled_upload": chunk `chunk` of this site's training faces, each
    protected `copies` times with the global g (fresh permutations), as float16 X_p with the
    site's pseudonymous label tokens for that upload (kept in its state-dir)."""
    if str(context.node_config.get(POOLED_UPLOAD_KEY, "allow")).lower() != "allow":
        raise PermissionError(f"node config {POOLED_UPLOAD_KEY!r} is not \"allow\": this site "
                              "ships no protected faces (pooled stage 2 refused)")
    site, tag = _site(context)
    cfg = run_config(context.run_config)
    configure_precision(cfg.cpu_precision)
    conf = msg.content[CONFIG]
    names = site_pseudonyms(state_dir(context.node_config), str(conf["upload-id"]), tag,
                            site.num_classes, held=_held_pseudonyms(context, conf))
    context.state[_pseudonym_key(conf)] = ArrayRecord(      # private: stays on the site
        {"labels": Array(names.labels), "site-token": Array(np.array([names.site_token]))})
    xp, labels, metrics = upload_chunk(
        site, msg.content[FROZEN_GENERATOR].to_torch_state_dict(), names,
        chunk=int(conf["chunk"]), chunk_images=int(conf["chunk-images"]),
        copies=int(conf["copies"]))
    return Message(RecordDict({PROTECTED: ArrayRecord({PROTECTED_KEY: Array(xp)}),
                               PSEUDONYMS: ArrayRecord({PSEUDONYMS_KEY: Array(labels)}),
                               UPLOAD_RECORD: MetricRecord(metrics)}), reply_to=msg)


@app.query(SITE_INFO_ACTION, mods=[outbound_guard])
def site_info(msg: Message, context: Context) -> Message:
    """Message type "query.site_info": the name this site's operator gave it (node config
    "site-name"), so the server's reports name sites instead of node ids; nothing else."""
    name = site_name(context.node_config)
    content = RecordDict({SITE_RECORD: ConfigRecord({SITE_NAME_KEY: name})} if name else {})
    return Message(content, reply_to=msg)
