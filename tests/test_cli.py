"""`minusfed protect`: X_p PNGs at the same relative paths; bad files are named and skipped."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from minusface.generator import UNetGenerator
from minusface.weights import save_generator
from minusfed.cli import main


def _face(path, mode="RGB", size=(112, 112), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_protect_writes_pngs_and_skips_bad_files(tmp_path, capsys, lfw_root):
    src, dst = tmp_path / "in", tmp_path / "out"
    real = sorted((lfw_root / "images" / "Aaron_Eckhart").glob("*.jpg"))[0]
    (src / "site" / "alice").mkdir(parents=True)
    (src / "site" / "alice" / "a.jpg").write_bytes(real.read_bytes())
    _face(src / "bob" / "gray.png", mode="L")                       # converted to RGB
    _face(src / "bob" / "big.png", size=(200, 150))                 # wrong size: skipped
    (src / "bob" / "notes.jpg").write_text("not an image")          # non-image: skipped
    (src / "bob" / "cut.jpg").write_bytes(real.read_bytes()[:1500])  # truncated: skipped
    torch.manual_seed(0)
    weights = tmp_path / "g.pt"
    save_generator(UNetGenerator(width=4), weights)
    rc = main(["protect", str(src), str(dst), "--weights", str(weights), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert written == ["bob/gray.png", "site/alice/a.png"]
    for name in ("big.png", "notes.jpg", "cut.jpg"):
        assert name in err
    assert "112x112" in err and "protected 2 image(s)" in out
    xp = np.asarray(Image.open(dst / "site" / "alice" / "a.png"))
    assert xp.shape == (112, 112, 3) and xp.dtype == np.uint8


def test_protect_without_weights_warns_loudly_and_bad_weights_fail_clearly(tmp_path, capsys, lfw_root):
    src = tmp_path / "in"
    _face(src / "x" / "a.png")
    assert main(["protect", str(src), str(tmp_path / "o"), "--width", "4", "--quiet"]) == 0
    assert "FRESHLY INITIALISED" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["protect", str(src), str(tmp_path / "o2"), "--weights", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main(["protect", str(tmp_path / "missing"), str(tmp_path / "o3"), "--width", "4"]) == 2
