"""Data in: the LFW archive -> the project's 112x112 layout, insightface .bin and .rec/.idx."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.data import read_pairs
from clients.formats import (
    MAGIC,
    OFFICIAL_MD5,
    RecordIO,
    UnsafeFileError,
    prepare_lfw,
    read_rec_faces,
    read_verification_bin,
    unpack_record,
)

PEOPLE = {"Ann_Example": 2, "Bob_O-Test": 1, "Cid_Third": 3}


def _original(seed: int) -> bytes:
    """A 250x250 JPEG like an LFW original: smooth, with a bright square where a face sits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:250, 0:250]
    img = np.stack([(x + 40 * seed) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8)
    img[60:190, 70:180] = rng.integers(120, 255, 3, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    originals = {}
    path = tmp_path / "lfw.tgz"
    with tarfile.open(path, "w:gz") as tar:
        seed = 0
        for person, n in PEOPLE.items():
            for i in range(1, n + 1):
                name = f"lfw/{person}/{person}_{i:04d}.jpg"
                originals[name] = _original(seed)
                _add(tar, name, originals[name])
                seed += 1
        _add(tar, "lfw/README.txt", b"not a face")
        link = tarfile.TarInfo("lfw/Evil/Evil_0001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path, originals


def _pairs(tmp_path: Path, text: str = "1\t1\nCid_Third\t1\t3\nAnn_Example\t2\tBob_O-Test\t1\n"
           ) -> Path:
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    return path


def _manifest_recipe(data: bytes) -> bytes:
    """MANIFEST.md "Preprocessing", step by step, written independently of clients.formats."""
    with Image.open(io.BytesIO(data)) as im:
        crop = im.convert("RGB").crop((50, 50, 200, 200)).resize((112, 112), Image.LANCZOS)
    out = io.BytesIO()
    crop.save(out, format="JPEG", quality=90, optimize=True)
    return out.getvalue()


def test_prepare_lfw_builds_the_manifest_layout_bit_exactly(tmp_path):
    archive, originals = _archive(tmp_path)
    pairs = _pairs(tmp_path)
    out = tmp_path / "lfw_112"
    result = prepare_lfw(archive, out, [pairs], progress=False)
    assert (result.images, result.identities) == (6, 3)
    assert result.ignored == ["lfw/README.txt", "lfw/Evil/Evil_0001.jpg"]
    assert not (out / "images" / "Evil").exists()
    for name, data in originals.items():
        person, file = name.split("/")[1:]
        made = out / "images" / person / file
        assert made.read_bytes() == _manifest_recipe(data)
        with Image.open(made) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (112, 112))
    assert (out / "pairs.txt").read_bytes() == pairs.read_bytes()
    assert len(read_pairs(out / "pairs.txt")) == 2
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 7 and sums == sorted(sums, key=lambda line: line.split("  ")[1])
    for line in sums:
        digest, rel = line.split("  ")
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert result.unofficial == ["pairs.txt"]       # not the official file's md5
    assert not (tmp_path / "lfw_112.partial").exists()


def test_prepare_lfw_never_overwrites_and_leaves_nothing_that_looks_complete(tmp_path):
    archive, _ = _archive(tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_lfw(archive, out, [_pairs(tmp_path)], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # a pairs file naming an image the archive lacks: refused, no OUT folder
    bad = _pairs(tmp_path, "1\t1\nCid_Third\t1\t9\nAnn_Example\t2\tBob_O-Test\t1\n")
    with pytest.raises(FileNotFoundError):
        prepare_lfw(archive, tmp_path / "new", [bad], progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="pairs.txt"):
        prepare_lfw(archive, tmp_path / "new", [], progress=False)


def test_official_pair_files_are_recognised(lfw_root):
    for name, md5 in OFFICIAL_MD5.items():
        assert hashlib.md5((lfw_root / name).read_bytes()).hexdigest() == md5


# --------------------------------------------------------------------------- .bin

def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _py2_pickle(bins: list[bytes], same: list[bool]) -> bytes:
    """What insightface's Python 2 scripts wrote: protocol 2, images as str (BINSTRING)."""
    out = b"\x80\x02]q\x00(" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in bins) + b"e"
    out += b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in same) + b"e\x86q\x02."
    return out


@pytest.mark.parametrize("style", ["python2", "protocol2", "protocol5", "numpy-flags"])
def test_verification_bin_is_read_in_every_style_insightface_wrote(tmp_path, style):
    bins, same = [_png(i) for i in range(6)], [True, False, True]
    if style == "python2":
        blob = _py2_pickle(bins, same)
    elif style == "numpy-flags":
        blob = pickle.dumps((bins, np.array(same)), protocol=4)
    else:
        blob = pickle.dumps((bins, same), protocol=2 if style == "protocol2" else 5)
    path = tmp_path / "lfw.bin"
    path.write_bytes(blob)
    ds = read_verification_bin(path)
    assert ds.images == bins and ds.same.tolist() == same
    assert ds.decode(3).shape == (112, 112, 3)


def test_verification_bin_of_real_lfw_faces(lfw_root, tmp_path):
    pairs = read_pairs(lfw_root / "pairs.txt")[295:305]       # same and different pairs
    bins = [Path(p).read_bytes() for pair in pairs for p in (pair.path_a, pair.path_b)]
    path = tmp_path / "lfw.bin"
    path.write_bytes(_py2_pickle(bins, [p.same for p in pairs]))
    ds = read_verification_bin(path)
    assert ds.same.tolist() == [p.same for p in pairs] and ds.same.any() and not ds.same.all()
    with Image.open(pairs[0].path_a) as im:
        assert np.array_equal(ds.decode(0), np.asarray(im.convert("RGB")))


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch /tmp/minusfed-test-pwned",))


def test_verification_bin_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = Path("/tmp/minusfed-test-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_png(0), _png(1)], [_Runs()]), protocol=2))
    with pytest.raises(UnsafeFileError, match="evil.bin: refused: .*system"):
        read_verification_bin(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(([_png(0)], [True]), protocol=4))
    with pytest.raises(ValueError, match="1 images for 1 pairs"):
        read_verification_bin(path)
    path.write_bytes(pickle.dumps(([_png(0), _png(1)], np.array([1.0])), protocol=4))
    with pytest.raises(ValueError, match="bool array"):
        read_verification_bin(path)


# --------------------------------------------------------------------------- .rec / .idx

def _write_record(f, data: bytes) -> None:
    """dmlc's RecordIOWriter::WriteRecord: a record holding the magic number at a 4-byte
    aligned position is split there (parts flagged 1, 2, 3) and the magic left out."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(data) - 3, 4) if data[i:i + 4] == magic]
    parts, start = [], 0
    for i in cuts:
        parts.append(data[start:i])
        start = i + 4
    parts.append(data[start:])
    for n, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if n == 0 else 3 if n == len(parts) - 1 else 2
        f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part)
        f.write(b"\0" * ((-len(part)) % 4))


def _pack(flag: int, label, id1: int, payload: bytes) -> bytes:
    if flag:
        return struct.pack("<IfQQ", flag, 0.0, id1, 0) + struct.pack(f"<{flag}f", *label) + payload
    return struct.pack("<IfQQ", 0, label, id1, 0) + payload


def test_rec_idx_training_set_is_read_without_mxnet(tmp_path):
    faces = [_png(i) for i in range(4)]
    faces[2] = faces[2][:8] + struct.pack("<I", MAGIC) * 2 + faces[2][8:]   # forces a split
    labels = [0, 0, 1, 1]
    records = [_pack(2, (5.0, 7.0), 0, b"")]                           # header: images 1..4
    records += [_pack(0, float(lab), k + 1, face) for k, (lab, face) in enumerate(zip(labels, faces))]
    records += [_pack(2, (1.0, 3.0), 5, b""), _pack(2, (3.0, 5.0), 6, b"")]   # identity ranges
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with open(rec, "wb") as f, open(idx, "w") as ix:
        for key, data in enumerate(records):
            ix.write(f"{key}\t{f.tell()}\n")
            _write_record(f, data)
    with RecordIO(rec) as r:
        assert len(r) == 7 and r.read(3) == records[3]
        header, payload = unpack_record(r.read(0))
        assert header.flag == 2 and header.label == (5.0, 7.0) and payload == b""
    got = list(read_rec_faces(rec, idx))
    assert [(k, lab) for k, lab, _ in got] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert [img for _, _, img in got] == faces
    with Image.open(io.BytesIO(got[0][2])) as im:
        assert im.size == (112, 112)


def test_rec_idx_damage_is_named(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with open(rec, "wb") as f:
        _write_record(f, _pack(0, 1.0, 1, _png(0)))
    idx.write_text("0\t0\n1\t99999999\n")
    with pytest.raises(ValueError, match="t.idx line 2"):
        RecordIO(rec, idx)
    idx.write_text("0\t4\n")
    with RecordIO(rec, idx) as r, pytest.raises(ValueError, match="bad magic"):
        r.read(0)


# --------------------------------------------------------------------------- the CLI

def test_cli_data_commands_end_to_end(lfw_root, tmp_path, capsys):
    from clients.data import scan_identity_folders
    from minusfed.cli import main

    archive, _ = _archive(tmp_path)
    out = tmp_path / "lfw_out"
    assert main(["data", "prepare-lfw", str(archive), str(out), "--pairs",
                 str(_pairs(tmp_path)), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "wrote 6 images of 3 people" in said.out and "not the official" in said.err
    assert main(["data", "prepare-lfw", str(archive), str(out), "--pairs",
                 str(_pairs(tmp_path)), "--quiet"]) == 2          # OUT exists: refused
    assert "already exists" in capsys.readouterr().err

    # a .bin of real LFW pairs -> an LFW-style folder whose pairs read back as the same faces
    pairs = read_pairs(lfw_root / "pairs.txt")[298:302]           # 2 same, 2 different
    bins = [Path(p).read_bytes() for pair in pairs for p in (pair.path_a, pair.path_b)]
    (tmp_path / "lfw.bin").write_bytes(_py2_pickle(bins, [p.same for p in pairs]))
    folder = tmp_path / "from_bin"
    assert main(["data", "from-bin", str(tmp_path / "lfw.bin"), str(folder), "--quiet"]) == 0
    back = read_pairs(folder / "pairs.txt")
    assert [p.same for p in back] == [True, True, False, False]
    originals = {(pair.path_a, pair.path_b) for pair in pairs}
    got = {(Path(p.path_a).read_bytes(), Path(p.path_b).read_bytes()) for p in back}
    assert got == {(Path(a).read_bytes(), Path(b).read_bytes()) for a, b in originals}

    # a .rec training set -> one folder per identity, as a site's data-path holds
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    faces = [Path(p).read_bytes() for p in (pairs[0].path_a, pairs[0].path_b, pairs[2].path_a)]
    with open(rec, "wb") as f, open(idx, "w") as ix:
        for key, (label, face) in enumerate(zip([7, 7, 9], faces)):
            ix.write(f"{key}\t{f.tell()}\n")
            _write_record(f, _pack(0, float(label), key, face))
    assert main(["data", "from-rec", str(rec), str(tmp_path / "sites"), "--quiet"]) == 0
    tree = scan_identity_folders(tmp_path / "sites")
    assert [(name, len(images)) for name, images in tree] == [("000007", 2), ("000009", 1)]
    assert Path(tree[1][1][0]).read_bytes() == faces[2]
