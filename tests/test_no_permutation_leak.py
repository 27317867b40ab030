"""No channel permutation is ever returned, stored or logged (checked by behaviour).

The operating system's CSPRNG is replaced by one that always yields the same, known
permutation.  Then the product's protect paths run for real: `minusfed protect` on LFW faces,
and a site's stage-2 train and evaluate round through the real ClientApp (every training and
evaluation batch is protected).  Everything they leave behind (written files, zip members
included; the reply; the site's Context.state; stdout, stderr and every log record) is searched
for that permutation and its inverse, as raw integers or floats of any common width and as
text.  The search is first shown to find a planted copy, so a clean result means something.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from minusface.shuffle import shuffle_channels

CHANNELS = 192
PREFIX = 24                  # values of the permutation a leak would have to contain in a row
TEXT_PREFIX = 12
DTYPES = ("<i8", "<i4", "<i2", "u1", "<f4", "<f8", ">i8", ">i4")


class Permutation:
    """A known permutation of the 192 channels, what the patched CSPRNG returns for it, and
    the needles a search looks for."""

    def __init__(self, seed: int = 20240) -> None:
        self.perm = np.random.default_rng(seed).permutation(CHANNELS)
        self.inverse = np.argsort(self.perm)
        keys = np.empty(CHANNELS, np.uint64)
        keys[self.perm] = np.arange(1, CHANNELS + 1, dtype=np.uint64)   # argsort(keys) == perm
        self.row = keys.tobytes()
        self.draws = 0                       # images shuffled with it
        self.needles = [p[:PREFIX].astype(d).tobytes() for p in (self.perm, self.inverse)
                        for d in DTYPES]
        self.patterns = [re.compile(r"(?<!\d)" + r"\D{1,8}".join(map(str, p[:TEXT_PREFIX]))
                                    + r"(?!\d)") for p in (self.perm, self.inverse)]

    def urandom(self, real):
        def draw(n: int) -> bytes:
            if n and n % len(self.row) == 0:
                self.draws += n // len(self.row)
                return self.row * (n // len(self.row))
            return real(n)
        return draw

    def found_in_bytes(self, blob: bytes) -> bool:
        return any(needle in blob for needle in self.needles)

    def found_in_text(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


def blobs(paths: Iterable[Path]) -> Iterator[tuple[str, bytes]]:
    """Every file under `paths`, and each member of those that are zip archives (.npz, .pt)."""
    for root in paths:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if not path.is_file():
                continue
            data = path.read_bytes()
            yield str(path), data
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        yield f"{path}!{member}", archive.read(member)


def record_blobs(records: RecordDict) -> Iterator[tuple[str, bytes]]:
    """The bytes of every Array and the text of every other record of a RecordDict."""
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                yield f"{name}/{key}", array.data
        else:
            yield name, repr(dict(record)).encode()


def leaks(known: Permutation, files: Iterable[Path] = (), records: Iterable[RecordDict] = (),
          texts: Iterable[str] = ()) -> list[str]:
    """Where the permutation (or its inverse) was found."""
    found = [where for where, blob in blobs(files) if known.found_in_bytes(blob)]
    for rd in records:
        for where, blob in record_blobs(rd):
            if known.found_in_bytes(blob) or known.found_in_text(blob.decode("latin-1")):
                found.append(where)
    found += [f"text: {t[:80]!r}" for t in texts if known.found_in_text(t)]
    return found


@pytest.fixture
def known(monkeypatch) -> Permutation:
    """The CSPRNG patched to the known permutation; the shuffle is shown to use it."""
    known = Permutation()
    monkeypatch.setattr(os, "urandom", known.urandom(os.urandom))
    r = torch.randn(2, CHANNELS, 3, 3)
    assert torch.equal(shuffle_channels(r), r[:, torch.from_numpy(known.perm)])
    known.draws = 0
    return known


@pytest.fixture
def logs(caplog, site_log):
    caplog.set_level(logging.DEBUG)          # Flower's logger does not propagate to the root
    return lambda: site_log.lines + [r.getMessage() for r in caplog.records]


def test_the_search_finds_a_planted_permutation(known, tmp_path):
    perm = torch.from_numpy(known.perm)
    torch.save({"perms": perm.view(1, -1)}, tmp_path / "state.pt")
    np.savez_compressed(tmp_path / "cache.npz", p=known.inverse.astype(np.int32))
    found = {where.split("!")[0] for where in leaks(known, files=[tmp_path])}
    assert found == {str(tmp_path / "state.pt"), str(tmp_path / "cache.npz")}
    rd = RecordDict({"a": ArrayRecord({"k": perm.to(torch.uint8)}),
                     "c": ConfigRecord({"note": str(known.perm.tolist())})})
    assert leaks(known, records=[rd]) == ["a/k", "c"]
    texts = [f"perm {perm}", f"{known.perm}", f"inverse {known.inverse.tolist()}"]
    assert len(leaks(known, texts=texts)) == 3
    assert not leaks(known, texts=[str(np.arange(CHANNELS).tolist()), "nothing here"])


def test_protect_command_stores_and_logs_no_permutation(known, logs, lfw_root, tmp_path,
                                                        capsys):
    from minusface.generator import UNetGenerator
    from minusface.weights import save_generator
    from minusfed.cli import main
    src, dst = tmp_path / "in", tmp_path / "out"
    for face in sorted((lfw_root / "images" / "Aaron_Eckhart").glob("*.jpg"))[:1] + \
            sorted((lfw_root / "images" / "Abel_Pacheco").glob("*.jpg"))[:2]:
        (src / face.parent.name).mkdir(parents=True, exist_ok=True)
        (src / face.parent.name / face.name).write_bytes(face.read_bytes())
    torch.manual_seed(0)
    save_generator(UNetGenerator(width=4), tmp_path / "g.pt")
    assert main(["protect", str(src), str(dst), "--weights", str(tmp_path / "g.pt")]) == 0
    out, err = capsys.readouterr()
    assert known.draws >= 3                            # every image used the known permutation
    assert len(list(dst.rglob("*.png"))) == 3
    assert leaks(known, files=[tmp_path], texts=[out, err, *logs()]) == []


def test_a_sites_stage2_round_stores_and_logs_no_permutation(known, logs, lfw_root, tmp_path,
                                                             site_dirs, monkeypatch, capsys):
    from clients.client_app import app
    from minusface.presets import get_preset
    from task.models import initial_arrays
    from task.records import FROZEN_GENERATOR, STAGE1, STAGE2
    from task.wire import select
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    preset = get_preset("tiny")
    cfg = {"preset": "tiny", "data-path": str(lfw_root), "out-dir": str(tmp_path / "run"),
           "max-identities": 12, "min-nodes": 2, "stage1-rounds": 1, "stage2-rounds": 1}
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg)
    frozen = ArrayRecord(select(initial_arrays(STAGE1, preset, 0), "generator"))
    arrays = ArrayRecord(initial_arrays(STAGE2, preset, 1))
    config = {"stage": STAGE2, "lr": 0.01, "local-epochs": 1, "minusfed-round": 2}
    train = app(Message(RecordDict({"arrays": arrays, FROZEN_GENERATOR: frozen,
                                    "config": ConfigRecord(config)}), 7, "train", group_id="1"),
                ctx)
    assert not train.has_error(), "\n".join(logs())
    trained = known.draws
    assert trained > 0                                 # the site protected its training faces
    evaluate = app(Message(RecordDict({"arrays": train.content["arrays"],
                                       FROZEN_GENERATOR: frozen,
                                       "config": ConfigRecord(config)}), 7, "evaluate",
                           group_id="1"), ctx)
    assert not evaluate.has_error(), "\n".join(logs())
    assert known.draws > trained                       # ... and its evaluation faces
    out, err = capsys.readouterr()
    assert leaks(known, files=[tmp_path, site_dirs],
                 records=[train.content, evaluate.content, ctx.state],
                 texts=[out, err, *logs()]) == []
