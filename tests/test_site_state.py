"""A site's raw-face cache and margin heads: where the site chooses, owner-only, surviving a
SuperNode restart (clients/site_state.py), driven through the real ClientApp handlers with a
real identity-folder tree of PNG faces and real Flower messages and contexts."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from clients import site_state
from clients.data import FaceDataset, load_faces
from federation.server_app import initial_arrays
from minusface.presets import get_preset
from task.records import STAGE1

RUN_ID = 4242


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory) -> Path:
    """A site's own folder: 4 identities x 4 random 112x112 PNG faces."""
    root = tmp_path_factory.mktemp("site-faces")
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / f"person_{i}").mkdir()
        for j in range(4):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"person_{i}" / f"{j:02d}.png")
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def context(faces: Path, out_dir: Path, **node: object) -> Context:
    """A fresh SuperNode context (empty state): what a restarted SuperNode starts with."""
    run = {"preset": "tiny", "out-dir": str(out_dir), "stage1-rounds": 3, "stage2-rounds": 1}
    return Context(run_id=RUN_ID, node_id=7, node_config={"data-path": str(faces), **node},
                   state=RecordDict(), run_config=run)


def train_message(rnd: int = 1) -> Message:
    sent = initial_arrays(STAGE1, get_preset("tiny"), 0)
    conf = ConfigRecord({"stage": STAGE1, "lr": 0.01, "local-epochs": 1, "minusfed-round": rnd})
    return Message(RecordDict({"arrays": ArrayRecord(sent), "config": conf}), 7, "train",
                   group_id="1")


def train(ctx: Context, rnd: int = 1) -> Message:
    from clients.client_app import app
    msg = train_message(rnd)
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["arrays"].keys()) == set(msg.content["arrays"].keys())
    return reply


def head_path(state: Path) -> Path:
    files = sorted(state.glob("head-*.pt"))
    assert len(files) == 1, files
    return files[0]


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# ---------------------------------------------------------------- where things live

def test_locations_come_only_from_the_site(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("MINUSFED_CACHE_DIR", "MINUSFED_STATE_DIR", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    cfg = site_state.configured_dir
    args_c, args_s = site_state.CACHE, site_state.STATE
    assert cfg({}, *args_c) == tmp_path / "home" / ".cache" / "minusfed"
    assert cfg({}, *args_s) == tmp_path / "home" / ".local" / "state" / "minusfed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")          # XDG: relative is invalid
    assert cfg({}, *args_c) == tmp_path / "xdg" / "minusfed"
    assert cfg({}, *args_s) == tmp_path / "home" / ".local" / "state" / "minusfed"
    monkeypatch.setenv("MINUSFED_CACHE_DIR", str(tmp_path / "env"))
    assert cfg({}, *args_c) == tmp_path / "env"
    assert cfg({"cache-dir": ""}, *args_c) == tmp_path / "env"        # empty = not set
    assert cfg({"cache-dir": str(tmp_path / "node")}, *args_c) == tmp_path / "node"
    assert cfg({"cache-dir": "OFF"}, *args_c) is None
    monkeypatch.setenv("MINUSFED_CACHE_DIR", "off")
    assert cfg({}, *args_c) is None
    assert cfg({"cache-dir": 3}, *args_c) is None                      # wrong type: off + warning


def test_cache_is_owner_only_in_the_site_folder_not_the_servers_out_dir(faces_dir, tmp_path):
    out, cache = tmp_path / "server-out", tmp_path / "site" / "cache"
    old = os.umask(0)                                # the most permissive umask a site might have
    try:
        train(context(faces_dir, out, **{"cache-dir": str(cache), "state-dir": "off"}))
    finally:
        os.umask(old)
    assert not out.exists()                           # nothing of the site's in the server's path
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".npz"], files   # no temporary left behind
    assert mode(cache) == 0o700 and mode(files[0]) == 0o600
    assert FaceDataset.from_cache(files[0]).num_images == 12   # 4 ids x 3 (one held out each)


def test_save_cache_never_exposes_a_partial_file_and_keeps_the_old_one(tmp_path, faces_dir,
                                                                       monkeypatch):
    path = tmp_path / "new" / "faces.npz"
    ds = load_faces(faces_dir, cache=path, progress=False)
    assert mode(path.parent) == 0o700 and mode(path) == 0o600
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space"):
        ds.save_cache(path)
    assert path.read_bytes() == before                # the user's cache is not lost
    assert [p.name for p in path.parent.iterdir()] == ["faces.npz"]   # no temporary left


def test_open_cache_folder_is_warned_about_and_left_as_is(faces_dir, tmp_path, caplog):
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    os.chmod(cache, 0o755)
    node = {"cache-dir": str(cache), "state-dir": "off"}
    with caplog.at_level(logging.INFO):               # root: clients.data logs the cache hit
        train(context(faces_dir, tmp_path / "out", **node))
        (npz,) = cache.iterdir()
        os.chmod(npz, 0o644)                          # e.g. copied in from an older install
        train(context(faces_dir, tmp_path / "out", **node))
    open_warnings = [m for m in messages(caplog, logging.WARNING) if "open to other users" in m]
    assert len(open_warnings) == 1 and str(cache) in open_warnings[0]   # once per process
    assert mode(cache) == 0o755                       # the site chose it: not changed
    assert list(cache.iterdir()) == [npz] and mode(npz) == 0o600   # our own file: tightened
    assert any("made it 0600" in m for m in messages(caplog, logging.WARNING))
    assert any(f"using face cache {npz}" in r.getMessage() for r in caplog.records)


def test_unwritable_cache_dir_trains_without_a_cache(faces_dir, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "cache"                         # cannot be created, even by root
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = train(context(faces_dir, tmp_path / "out", **{"cache-dir": str(cache),
                                                              "state-dir": "off"}))
        train(context(faces_dir, tmp_path / "out", **{"cache-dir": str(cache), "state-dir": "off"}))
    assert reply.content["metrics"]["num-examples"] == 12
    warned = [m for m in messages(caplog, logging.WARNING) if str(cache) in m]
    assert len(warned) == 1 and "'cache-dir'" in warned[0]
    assert blocker.read_text() == "not a folder"


def test_cache_write_failure_mid_round_trains_without_a_cache(faces_dir, tmp_path, caplog,
                                                              monkeypatch):
    def full_disk(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(FaceDataset, "save_cache", full_disk)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = train(context(faces_dir, tmp_path / "out", **{"cache-dir": str(cache),
                                                              "state-dir": "off"}))
    assert reply.content["metrics"]["num-examples"] == 12
    assert any("No space" in m and "'cache-dir'" in m for m in messages(caplog, logging.WARNING))
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- margin heads

def test_head_survives_a_supernode_restart(faces_dir, tmp_path, caplog, monkeypatch):
    import clients.client_app as ca
    state = tmp_path / "state"
    node = {"state-dir": str(state), "cache-dir": "off"}
    first = context(faces_dir, tmp_path / "out", **node)
    reply = train(first, rnd=1)
    path = head_path(state)
    assert f"run{RUN_ID}" in path.name and STAGE1 in path.name
    assert mode(state) == 0o700 and mode(path) == 0o600
    saved = torch.load(path, weights_only=True)
    in_memory = first.state[f"head-{STAGE1}"].to_torch_state_dict()
    assert saved.keys() == in_memory.keys()
    assert all(torch.equal(saved[k], in_memory[k]) for k in saved)
    shapes = {tuple(a.shape) for a in reply.content["arrays"].values()}
    assert tuple(saved["weight"].shape) not in shapes  # never in a message

    used = []
    real = ca.stage_models
    monkeypatch.setattr(ca, "stage_models",
                        lambda *a, **k: used.append(a[5]) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger="flwr"):
        train(context(faces_dir, tmp_path / "out", **node), rnd=2)   # fresh Context = restart
    assert any(f"restored head from {path}" in m for m in messages(caplog, logging.INFO))
    assert not any("restarts" in m for m in messages(caplog, logging.WARNING))
    assert torch.equal(used[0]["weight"], saved["weight"])      # training went on from it
    assert not torch.equal(torch.load(path, weights_only=True)["weight"], saved["weight"])


def test_without_a_head_file_a_later_round_warns_that_the_head_restarts(faces_dir, tmp_path,
                                                                        caplog):
    node = {"state-dir": "off", "cache-dir": "off"}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train(context(faces_dir, tmp_path / "out", **node), rnd=1)
        assert not any("restarts" in m for m in messages(caplog, logging.WARNING))
        train(context(faces_dir, tmp_path / "out", **node), rnd=2)
    assert any("restarts from scratch" in m and "round 2" in m
               for m in messages(caplog, logging.WARNING))


def test_head_file_of_the_wrong_shape_falls_back_to_a_fresh_head(faces_dir, tmp_path, caplog):
    state = tmp_path / "state"
    node = {"state-dir": str(state), "cache-dir": "off"}
    train(context(faces_dir, tmp_path / "out", **node), rnd=1)
    path = head_path(state)
    good = torch.load(path, weights_only=True)
    emb, classes = good["weight"].shape
    site_state.save_head(path, {"weight": torch.zeros(emb, classes + 3)})   # data changed
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train(context(faces_dir, tmp_path / "out", **node), rnd=2)
    warned = messages(caplog, logging.WARNING)
    assert any("does not fit" in m and str(path) in m for m in warned)
    assert any("restarts from scratch" in m for m in warned)
    assert torch.load(path, weights_only=True)["weight"].shape == (emb, classes)


def test_head_file_that_is_not_a_head_is_ignored_and_never_executed(faces_dir, tmp_path, caplog):
    state = tmp_path / "state"
    node = {"state-dir": str(state), "cache-dir": "off"}
    train(context(faces_dir, tmp_path / "out", **node), rnd=1)
    path = head_path(state)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    torch.save({"weight": Payload()}, path)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train(context(faces_dir, tmp_path / "out", **node), rnd=2)
    assert not marker.exists()
    assert any("unreadable" in m and str(path) in m for m in messages(caplog, logging.WARNING))
    path.write_bytes(b"\x00garbage")
    assert site_state.load_head(path) is None
    os.unlink(path)
    os.symlink(tmp_path / "elsewhere.pt", path)
    assert site_state.load_head(path) is None


def test_unusable_state_dir_still_trains(faces_dir, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = train(context(faces_dir, tmp_path / "out", **{"state-dir": str(blocker / "s"),
                                                              "cache-dir": "off"}))
    assert reply.content["metrics"]["num-examples"] == 12
    assert any(str(blocker / "s") in m and "'state-dir'" in m
               for m in messages(caplog, logging.WARNING))


def test_stage_round_counts_stage2_after_stage1():
    from clients.client_app import _stage_round
    from task.config import run_config
    cfg = run_config({"stage1-rounds": 3})
    assert _stage_round(ConfigRecord({"minusfed-round": 2}), cfg, "stage1") == 2
    assert _stage_round(ConfigRecord({"minusfed-round": 4}), cfg, "stage2") == 1
    assert _stage_round(ConfigRecord({"minusfed-round": 5}), cfg, "stage2") == 2
    assert _stage_round(ConfigRecord({}), cfg, "stage2") == 0
