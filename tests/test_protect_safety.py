"""`minusfed protect` never loses or corrupts a user's files: output names, overlapping folders,
existing files, symbolic links, bad numbers and paths, weights and X_p checks (real CLI, real
files, a real width-4 generator)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clients.data import IMAGE_EXTENSIONS
from clients.protect_dir import ProtectError, check_outputs, write_png
from minusface.generator import UNetGenerator
from minusface.weights import WeightsError, load_generator, save_generator
from minusfed.cli import main


def _face(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("g") / "g.pt"
    save_generator(UNetGenerator(width=4), path)
    return path


def _protect(src: Path, dst: Path, weights: Path, *extra: str) -> int:
    return main(["protect", str(src), str(dst), "--weights", str(weights), "--quiet", *extra])


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (links not followed) -> its bytes: 'nothing changed' made testable."""
    return {p.relative_to(root).as_posix(): (b"link:" + os.readlink(p).encode()
                                             if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


# --------------------------------------------------------------------------- output names

@pytest.mark.parametrize("names", [("face.jpg", "face.jpeg", "face.png"), ("A.jpg", "a.png")])
def test_inputs_sharing_an_output_name_refuse_the_run(tmp_path, capsys, weights, names):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate(names):
        _face(src / "bob" / name, seed=i)
    _face(src / "carol" / "face.jpg", seed=9)           # same name in another folder is fine
    assert _protect(src, dst, weights) == 2
    err = capsys.readouterr().err
    assert "same PNG" in err and all(f"bob/{n}" in err for n in names)
    assert "carol" not in err and not dst.exists()


def test_outputs_keep_relative_paths_and_are_whole_pngs(tmp_path, capsys, weights):
    src, dst = tmp_path / "in", tmp_path / "out"
    _face(src / "bob" / "face.jpg")
    _face(src / "bob" / "deep" / "x.webp", seed=1)
    before = _snapshot(src)
    assert _protect(src, dst, weights, "--batch-size", "1") == 0
    assert "protected 2 image(s)" in capsys.readouterr().out
    assert sorted(_snapshot(dst)) == ["bob/deep/x.png", "bob/face.png"]     # no temp files left
    for p in dst.rglob("*.png"):
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.size == (112, 112) and im.mode == "RGB"
    assert _snapshot(src) == before


# --------------------------------------------------------------------------- where X_p goes

@pytest.mark.parametrize("where", ["same", "inside", "contains", "link-to-in"])
def test_out_dir_overlapping_in_dir_is_refused(tmp_path, capsys, weights, where):
    src = tmp_path / "faces"
    _face(src / "bob" / "face.png")
    _face(src / "old" / "earlier_output.png", seed=1)
    out = {"same": src, "inside": src / "old", "contains": tmp_path,
           "link-to-in": tmp_path / "link"}[where]
    if where == "link-to-in":
        out.symlink_to(src, target_is_directory=True)
    before = _snapshot(tmp_path)
    assert _protect(src, out, weights, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "OUT_DIR" in err and "IN_DIR" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before                 # originals untouched, nothing added


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, capsys, weights):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        _face(src / f"p{i}.jpg", seed=i)
    (dst).mkdir()
    (dst / "mine.txt").write_text("user file, not an output")
    assert _protect(src, dst, weights) == 0
    first = _snapshot(dst)
    capsys.readouterr()
    assert _protect(src, dst, weights) == 2
    err = capsys.readouterr().err
    assert "already holds 3" in err and "p0.png" in err and "--overwrite" in err
    assert _snapshot(dst) == first
    assert _protect(src, dst, weights, "--overwrite") == 0
    second = _snapshot(dst)
    assert second["mine.txt"] == first["mine.txt"]
    assert all(second[f"p{i}.png"] != first[f"p{i}.png"] for i in range(3))   # fresh permutations


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlinks_in_out_dir_are_never_written_through(tmp_path, capsys, weights, overwrite):
    src, dst, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    _face(src / "bob" / "face.jpg")
    _face(src / "carol" / "face.jpg", seed=1)
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("must survive")
    (dst / "bob").mkdir(parents=True)
    (dst / "bob" / "face.png").symlink_to(victim)        # a link at an output path
    (dst / "carol").symlink_to(outside, target_is_directory=True)   # a linked folder
    before = _snapshot(tmp_path)
    assert _protect(src, dst, weights, *(["--overwrite"] if overwrite else [])) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and sorted(os.listdir(outside)) == ["precious.txt"]


def test_write_png_keeps_a_file_that_appeared_and_leaves_no_temp(tmp_path):
    arr = np.zeros((112, 112, 3), np.uint8)
    dst = tmp_path / "x.png"
    dst.write_bytes(b"someone else's")
    with pytest.raises(ProtectError, match="x.png"):
        write_png(arr, dst, overwrite=False)
    assert dst.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["x.png"]
    write_png(arr, dst, overwrite=True)
    assert np.array_equal(np.asarray(Image.open(dst)), arr) and os.listdir(tmp_path) == ["x.png"]


# --------------------------------------------------------------------------- bad numbers, paths

@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--batch-size", "-1"],
                                  ["--width", "0"], ["--batch-size", "two"]])
def test_bad_numbers_are_argument_errors(tmp_path, capsys, args):
    src = tmp_path / "in"
    _face(src / "a.png")
    with pytest.raises(SystemExit) as exc:
        main(["protect", str(src), str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {args[0]}" in err and "integer >= 1" in err
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys, weights):
    src = tmp_path / "in"
    _face(src / "a.png")
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    for out, message in ((blocker, "is not a folder"), (blocker / "sub", "cannot be created")):
        assert _protect(src, out, weights) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: OUT_DIR {out}") and message in err and "\n" not in err
    assert blocker.read_text() == "a file"


def test_folder_without_images_names_it_and_what_was_looked_for(tmp_path, capsys, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _protect(empty, tmp_path / "out", weights) == 2
    err = capsys.readouterr().err
    assert f"IN_DIR {empty}" in err and ".jpg" in err and ".webp" in err and "empty" in err
    (empty / "notes.txt").write_text("x")
    assert _protect(empty, tmp_path / "out", weights) == 2
    assert "notes.txt (not an image file name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skips_reported_once_and_ignored_entries_listed(tmp_path, capsys, weights):
    src, dst = tmp_path / "in", tmp_path / "out"
    _face(src / "bob" / "good.png")
    (src / "bob" / "corrupt.jpg").write_text("not a jpeg")
    (src / "bob" / "notes.txt").write_text("notes")
    (src / "bob" / "loop.jpg").symlink_to(src / "bob" / "loop.jpg")         # ELOOP
    (src / "bob" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")         # broken
    (src / "bob" / "up").symlink_to(src, target_is_directory=True)          # folder loop
    (src / "bob" / "alias.png").symlink_to(src / "bob" / "good.png")        # a file link: used
    _face(src / ".cache" / "thumb.png")
    os.mkfifo(src / "bob" / "pipe.png")                  # reading it would block forever
    rc = main(["-v", "protect", str(src), str(dst), "--weights", str(weights), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and "protected 2 image(s)" in out and "skipped 1" in out
    assert sum("corrupt.jpg" in line for line in err.splitlines()) == 1   # once, even with -v
    assert "ignored 6 entries" in err
    for name, reason in (("bob/loop.jpg", "symlink loop"), ("bob/gone.jpg", "broken symlink"),
                         ("bob/up", "symlinked folder"), ("bob/notes.txt", "not an image"),
                         (".cache", "hidden folder"), ("bob/pipe.png", "not a regular file")):
        assert f"{name} ({reason}" in err
    assert sorted(_snapshot(dst)) == ["bob/alias.png", "bob/good.png"]


def test_help_documents_names_and_every_extension(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = capsys.readouterr().out
    assert "--overwrite" in text and "face.jpg -> OUT_DIR/bob/face.png" in text
    assert all(ext in text for ext in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- weights and X_p

def _bad_weights(tmp_path: Path, key: str, value) -> Path:
    state = dict(UNetGenerator(width=4).state_dict())
    state[key] = value
    path = tmp_path / f"bad-{key}.pt"
    torch.save({"generator": state, "width": 4}, path)
    return path


def test_weights_with_a_non_tensor_entry_or_nan_are_refused(tmp_path, capsys):
    src = tmp_path / "in"
    _face(src / "a.png")
    nan = UNetGenerator(width=4).state_dict()["dec2.block.0.weight"].clone()
    nan[0, 0, 0, :2] = float("nan")
    cases = ((_bad_weights(tmp_path, "enc2.0.bias", "hello"), r"'enc2.0.bias' is a str"),
             (_bad_weights(tmp_path, "dec2.block.0.weight", nan),
              r"'dec2.block.0.weight' holds 2 NaN/Inf .*diverged"),
             (_bad_weights(tmp_path, "enc1.0.weight",
                           torch.zeros(1, 1, 1, 1).expand(4096, 192, 3, 3)), r"width 4096"))
    for path, message in cases:
        with pytest.raises(WeightsError, match=message):
            load_generator(path)
        assert main(["protect", str(src), str(tmp_path / "o"), "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and path.name in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_generator_that_outputs_nan_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    g = UNetGenerator(width=4)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(1e6)                                  # finite weights, overflowing activations
    weights = tmp_path / "huge.pt"
    save_generator(g, weights)
    src, dst = tmp_path / "in", tmp_path / "out"
    _face(src / "a.png")
    assert _protect(src, dst, weights) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    assert not list(dst.rglob("*.png")) if dst.exists() else True


def test_constant_x_p_of_a_real_face_is_refused():
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    with pytest.raises(ProtectError, match=r"b.png is a constant image"):
        check_outputs(faces, torch.stack([torch.rand(3, 112, 112), torch.ones(3, 112, 112)]),
                      [Path("a.png"), Path("b.png")])
    flat = torch.zeros(1, 3, 112, 112)                   # a flat input may give a flat X_p
    assert check_outputs(flat, torch.ones(1, 3, 112, 112), [Path("c.png")])[0].max() == 255


@pytest.mark.parametrize("meta, expected", [
    ({"preset": "cpu-small", "stage1-rounds-aggregated": 0}, "UNTRAINED"),
    ({"preset": "tiny", "stage1-rounds-aggregated": 2}, "smoke preset 'tiny'"),
    ({"preset": "cpu-small", "stage1-rounds-aggregated": 5}, None),
    ({}, None),                                   # a file written before runs recorded this
])
def test_protect_warns_about_an_untrained_or_smoke_generator(tmp_path, capsys, meta, expected):
    path = tmp_path / "g.pt"
    save_generator(UNetGenerator(width=4), path, meta=meta)
    src = tmp_path / "in"
    _face(src / "a.png")
    assert _protect(src, tmp_path / "out", path) == 0
    err = capsys.readouterr().err
    if expected is None:
        assert "WARNING" not in err
    else:
        assert "WARNING" in err and expected in err
