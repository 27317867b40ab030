"""Site data: image decoding errors, identity folders, FaceDataset + cache, LFW pair protocol."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from clients.data import (
    FaceDataset,
    ImageError,
    decode_image,
    identities_in_pairs,
    load_faces,
    load_image,
    pair_index,
    read_pairs,
    scan_identity_folders,
    view1_split,
    view2_fold_split,
)

SAMPLE = "images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg"


def _face(path: Path, seed: int = 0, size: tuple[int, int] = (112, 112), mode: str = "RGB",
          gradient: bool = False) -> Path:
    """Write a synthetic image; ``gradient`` makes it left-right asymmetric (flip detectable)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if gradient:
        arr[:] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _site(root: Path) -> dict[str, list[Path]]:
    """Three identities with 2, 3, 1 lossless images."""
    counts = {"Alice": 2, "Bob": 3, "Carol": 1}
    return {n: [_face(root / n / f"{n}_{i:04d}.png", seed=10 * k + i) for i in range(1, c + 1)]
            for k, (n, c) in enumerate(counts.items())}


# --------------------------------------------------------------------------- load_image

def test_load_image_range_and_formula(lfw_root: Path) -> None:
    x = load_image(lfw_root / SAMPLE)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    raw = np.asarray(Image.open(lfw_root / SAMPLE).convert("RGB"), dtype=np.float32)
    assert torch.equal(x, torch.from_numpy((raw / 255 - 0.5) / 0.5).permute(2, 0, 1))
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_non_image_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a JPEG")
    with pytest.raises(ImageError, match="notes.jpg.*not a readable image"):
        load_image(p)


def test_truncated_jpeg_is_a_clear_error(tmp_path: Path, lfw_root: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = (lfw_root / SAMPLE).read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="half.jpg.*truncated"):
        load_image(p)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    ext = "jpg" if mode == "CMYK" else "png"
    p = _face(tmp_path / f"face.{ext}", mode=mode)
    x = load_image(p)
    assert x.shape == (3, 112, 112)
    if mode == "L":                                     # grey -> three equal channels
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A real 16-bit PNG (grey, grey+alpha, RGB or RGBA) written byte by byte: Pillow cannot
    write 16-bit colour, and these are what scanners and HDR tools hand a site."""
    import struct
    import zlib
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def _face16(channels: int, seed: int = 0) -> np.ndarray:
    """A bright 16-bit image: almost every value above 255, so clipping would turn it white."""
    rng = np.random.default_rng(seed)
    shape = (112, 112) if channels == 1 else (112, 112, channels)
    arr = rng.integers(256, 65536, shape, dtype=np.uint16)
    ramp = np.linspace(300, 65535, 40, dtype=np.uint16)            # a visible gradient
    arr[:, :40] = ramp[:, None] if channels > 1 else ramp
    return arr


def _assert_high_byte(decoded: np.ndarray, grey_or_rgb: np.ndarray) -> None:
    expected = (grey_or_rgb >> 8).astype(np.int32)
    expected = np.repeat(expected[:, :, None], 3, axis=2) if expected.ndim == 2 else expected
    assert decoded.dtype == np.uint8 and decoded.shape == (112, 112, 3)
    assert np.abs(decoded.astype(np.int32) - expected).max() <= 1
    assert (decoded == 255).mean() < 0.05                   # not the white square of clipping


def test_16bit_grey_png_and_tiff_decode_to_the_high_byte(tmp_path: Path) -> None:
    grey = _face16(1)
    for name in ("grey16.png", "grey16.tif"):                # Pillow mode I;16
        Image.fromarray(grey).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I;16"
        _assert_high_byte(decode_image(tmp_path / name), grey)
    pgm = tmp_path / "grey16.pgm"                            # Pillow mode I, 0..65535
    pgm.write_bytes(b"P5 112 112 65535\n" + grey.astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    _assert_high_byte(decode_image(pgm), grey)
    x = load_image(tmp_path / "grey16.png")                  # the training path: same pixels
    assert torch.equal(x, load_image(pgm))


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_and_alpha_pngs_decode_to_the_high_byte(tmp_path: Path, channels: int) -> None:
    arr = _face16(channels, seed=channels)
    p = _png16(tmp_path / f"face16_{channels}.png", arr)
    rgb = arr[..., 0] if channels == 2 else arr[..., :3]     # alpha is dropped
    _assert_high_byte(decode_image(p), rgb)


def test_images_without_a_defined_8bit_scale_are_refused(tmp_path: Path) -> None:
    grey = _face16(1).astype(np.float32)
    Image.fromarray(grey).save(tmp_path / "float.tif")
    with pytest.raises(ImageError, match=r"float.tif.*mode F"):
        decode_image(tmp_path / "float.tif")
    Image.fromarray(grey.astype(np.int32) * 4).save(tmp_path / "wide.tif")     # up to 262140
    with pytest.raises(ImageError, match=r"wide.tif.*values .*0\.\.65535"):
        decode_image(tmp_path / "wide.tif")
    Image.fromarray(np.full((112, 112), 200, np.int32)).save(tmp_path / "eight.tif")
    with pytest.raises(ImageError, match=r"eight.tif.*200\.\.200"):
        decode_image(tmp_path / "eight.tif")


@pytest.mark.parametrize("mode", ["1", "LA", "P", "RGBA", "YCbCr"])
def test_8bit_modes_keep_their_colours(tmp_path: Path, mode: str) -> None:
    """Flat colour in, the same colour out: alpha and palette transparency do not blacken it."""
    colour = (255, 255, 255) if mode == "1" else (200, 120, 40)
    img = Image.new("RGB", (112, 112), colour)
    img = img.convert(mode, **({"palette": Image.Palette.ADAPTIVE} if mode == "P" else {}))
    if mode == "RGBA":
        img.putalpha(0)                                      # fully transparent: still the face
    path = tmp_path / ("face.jpg" if mode == "YCbCr" else "face.png")
    img.save(path, **({"transparency": int(img.getpixel((0, 0)))} if mode == "P" else {}))
    out = decode_image(path)
    expected = np.asarray(img.convert("RGB")).astype(int)
    assert np.abs(out.astype(int) - expected).max() <= (3 if mode == "YCbCr" else 0)
    if mode in ("RGBA", "P", "1"):
        assert np.abs(out[0, 0].astype(int) - np.array(colour)).max() <= 3


def test_wrong_size_errors_unless_resize(tmp_path: Path) -> None:
    p = _face(tmp_path / "big.png", size=(120, 100))
    with pytest.raises(ImageError, match=r"big.png.*120x100.*112x112"):
        load_image(p)
    assert load_image(p, resize=True).shape == (3, 112, 112)


def test_missing_image_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")


# --------------------------------------------------------------------------- folders

def test_scan_identity_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _site(tmp_path)
    (tmp_path / "Empty").mkdir()
    (tmp_path / "Bob" / "notes.txt").write_text("x")
    (tmp_path / "README.md").write_text("x")
    with caplog.at_level(logging.INFO, logger="clients.data"):
        found = scan_identity_folders(tmp_path)
    assert [n for n, _ in found] == ["Alice", "Bob", "Carol"]
    assert [len(p) for _, p in found] == [2, 3, 1]
    assert found[1][1] == sorted(found[1][1])
    assert "1 empty identity folder" in caplog.text
    assert [n for n, _ in scan_identity_folders(tmp_path, min_images_per_identity=2)] == \
        ["Alice", "Bob"]
    with pytest.raises(ValueError, match="Empty"):
        scan_identity_folders(tmp_path, skip_empty=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_identity_folders(tmp_path / "missing")


# --------------------------------------------------------------------------- FaceDataset

def test_dataset_labels_and_repeat(tmp_path: Path) -> None:
    site = _site(tmp_path)
    ds = FaceDataset(site, repeat=3)
    assert ds.identities == ["Alice", "Bob", "Carol"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2] and len(ds) == 18
    assert ds.paths[0] == "Alice/Alice_0001.png"
    x5, y5 = ds[5]
    x11, y11 = ds[11]
    assert torch.equal(x5, x11) and y5 == y11 == 2
    assert torch.equal(x5, load_image(site["Carol"][0]))
    pairs = [(p, 7) for p in site["Bob"]] + [(site["Alice"][0], 3)]
    ds2 = FaceDataset(pairs)
    assert ds2.identities == ["3", "7"] and ds2.labels.tolist() == [1, 1, 1, 0]


def test_dataset_skips_corrupt_file_and_reports_it(tmp_path: Path, caplog, capsys) -> None:
    site = _site(tmp_path)
    bad = tmp_path / "Bob" / "Bob_0004.png"
    bad.write_bytes(site["Bob"][0].read_bytes()[:200])
    site["Bob"].append(bad)
    with caplog.at_level(logging.WARNING, logger="clients.data"):
        ds = FaceDataset(site)
    assert ds.num_images == 6 and [p for p, _ in ds.skipped] == [str(bad)]
    assert str(bad) in caplog.text
    assert "skipped 1 of 7" in capsys.readouterr().err
    with pytest.raises(ImageError, match="Bob_0004"):
        FaceDataset(site, skip_errors=False)


def test_dataset_drops_identity_left_without_images(tmp_path: Path) -> None:
    site = _site(tmp_path)
    site["Carol"][0].write_text("garbage")
    ds = FaceDataset(site)
    assert ds.identities == ["Alice", "Bob"] and ds.labels.max() == 1


def test_flip_only_in_train_mode(tmp_path: Path) -> None:
    p = _face(tmp_path / "A" / "A_0001.png", gradient=True)
    x0 = load_image(p)
    train, test = FaceDataset({"A": [p]}, train=True), FaceDataset({"A": [p]}, train=False)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(200)]
    n_orig = sum(torch.equal(d, x0) for d in draws)
    n_flip = sum(torch.equal(d, x0.flip(2)) for d in draws)
    assert n_orig + n_flip == 200 and n_orig > 0 and n_flip > 0
    assert 60 < n_orig < 140                            # p = 0.5 (p ~ 1e-8 to fail by chance)
    assert all(torch.equal(test[0][0], x0) for _ in range(50))


def test_cache_round_trip_equals_direct_decode(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "site"
    _site(root)
    cache = tmp_path / "cache" / "site.npz"
    direct = load_faces(root, cache=cache)
    assert cache.is_file()
    cached = FaceDataset.from_cache(cache)
    assert np.array_equal(np.asarray(cached.images), direct.images)
    assert np.array_equal(cached.labels, direct.labels)
    assert cached.identities == direct.identities and cached.paths == direct.paths
    assert all(torch.equal(cached[i][0], direct[i][0]) for i in range(direct.num_images))

    import clients.data as data_mod  # a matching cache must not decode
    monkeypatch.setattr(data_mod, "_decode_all", lambda *a, **k: pytest.fail("decoded"))
    again = load_faces(root, cache=cache, train=True, repeat=3)
    assert again.train and len(again) == 3 * direct.num_images
    monkeypatch.undo()

    _face(root / "Dave" / "Dave_0001.png", seed=99)   # file list changed -> rebuild
    rebuilt = load_faces(root, cache=cache)
    assert "Dave" in rebuilt.identities
    assert "Dave" in FaceDataset.from_cache(cache).identities


def test_cache_of_real_faces(tmp_path: Path, lfw_root: Path) -> None:
    names = ["Aaron_Peirsol", "Abdullah_Gul"]
    mapping = {n: sorted((lfw_root / "images" / n).glob("*.jpg")) for n in names}
    ds = load_faces(mapping, cache=tmp_path / "c.npz")
    back = load_faces(mapping, cache=tmp_path / "c.npz")
    assert isinstance(back.images, np.memmap)
    assert np.array_equal(np.asarray(back.images), ds.images)
    assert torch.equal(back[0][0], load_image(mapping["Aaron_Peirsol"][0]))


# --------------------------------------------------------------------------- pairs

def _pairs_site(tmp_path: Path, body: str) -> Path:
    for name, n in (("Ann", 2), ("Ben", 1)):
        for i in range(1, n + 1):
            _face(tmp_path / "images" / name / f"{name}_{i:04d}.jpg", seed=i)
    p = tmp_path / "pairs.txt"
    p.write_text(body)
    return p


def test_read_small_pairs_file(tmp_path: Path) -> None:
    pairs = read_pairs(_pairs_site(tmp_path, "1\nAnn\t1\t2\nAnn\t1\tBen\t1\n"))
    assert [(Path(p.path_a).name, Path(p.path_b).name, p.same, p.fold) for p in pairs] == [
        ("Ann_0001.jpg", "Ann_0002.jpg", True, 0), ("Ann_0001.jpg", "Ben_0001.jpg", False, 0)]
    assert identities_in_pairs(pairs) == {"Ann", "Ben"}
    paths, a, b = pair_index(pairs)
    assert len(paths) == 3 and paths[a[1]] == pairs[1].path_a and paths[b[1]] == pairs[1].path_b


def test_missing_pairs_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        read_pairs(tmp_path / "nothere.txt")


def test_pair_naming_absent_image(tmp_path: Path) -> None:
    p = _pairs_site(tmp_path, "1\nAnn\t1\t2\nAnn\t1\tBen\t2\n")
    with pytest.raises(FileNotFoundError, match=r"Ben_0002.jpg.*pairs.txt:3"):
        read_pairs(p)


@pytest.mark.parametrize("body, line", [
    ("1\nAnn\t1\nAnn\t1\tBen\t1\n", 2),                # too few fields
    ("1\nAnn\t1\t2\nAnn\t1\t2\n", 3),                  # same-pair line where different expected
    ("1\nAnn\tx\t2\nAnn\t1\tBen\t1\n", 2),             # non-integer image number
    ("ten\nAnn\t1\t2\n", 1),                           # bad header
])
def test_malformed_pairs_line(tmp_path: Path, body: str, line: int) -> None:
    with pytest.raises(ValueError, match=rf"pairs.txt:{line}\b"):
        read_pairs(_pairs_site(tmp_path, body))


def test_lfw_view2_counts(lfw_root: Path) -> None:
    pairs = read_pairs(lfw_root / "pairs.txt")
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    assert sorted({p.fold for p in pairs}) == list(range(10))
    assert all(sum(p.fold == k for p in pairs) == 600 for k in range(10))
    assert [p.same for p in pairs[:600]] == [True] * 300 + [False] * 300
    assert len(read_pairs(lfw_root / "pairsDevTrain.txt")) == 2200
    assert len(read_pairs(lfw_root / "pairsDevTest.txt")) == 1000


def test_view2_folds_are_identity_disjoint(lfw_root: Path) -> None:
    all_pairs = read_pairs(lfw_root / "pairs.txt")
    in_any_pair = identities_in_pairs(all_pairs)
    for k in range(10):
        train, test = view2_fold_split(lfw_root, k)
        assert len(test) == 600 and {p.fold for p in test} == {k}
        assert not set(train) & identities_in_pairs(test), f"fold {k} leaks identities"
        assert all(len(v) >= 2 for v in train.values())
        assert len(set(train) - in_any_pair) == 52   # MANIFEST: 52 no-pair ids with >= 2 images
        others = identities_in_pairs(p for p in all_pairs if p.fold != k)
        assert set(train) & others                      # the other 9 folds do train
    with pytest.raises(ValueError, match="fold"):
        view2_fold_split(lfw_root, 10)


def test_view1_split_is_identity_disjoint(lfw_root: Path) -> None:
    train, test = view1_split(lfw_root)
    assert len(test) == 1000 and not set(train) & identities_in_pairs(test)
    assert len(train) == 1262                           # MANIFEST count
    train1, _ = view1_split(lfw_root, min_images_per_identity=1)
    assert sum(len(v) for v in train1.values()) == 10492


# --------------------------------------------------------------------------- federation identities

def test_federation_identities_are_remembered_copied_and_refreshed(tmp_path: Path) -> None:
    import os

    from clients import site as site_mod
    from minusface.presets import get_preset

    for name, n in (("Ann", 2), ("Ben", 3), ("Cid", 2), ("Dee", 1)):
        for i in range(1, n + 1):
            _face(tmp_path / "images" / name / f"{name}_{i:04d}.jpg", seed=i)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nAnn\t1\t2\nAnn\t1\tCid\t1\n")   # one fold: Ann and Cid are test identities
    preset = get_preset("tiny")
    site_mod._federation_identities.cache_clear()
    first = site_mod.federation_identities(tmp_path, 0, preset)
    assert sorted(first) == ["Ben"] and len(first["Ben"]) == 3
    first["Ben"].pop()                                   # a caller's change stays its own
    again = site_mod.federation_identities(tmp_path, 0, preset)
    assert len(again["Ben"]) == 3
    assert site_mod._federation_identities.cache_info().hits == 1
    pairs.write_text("1\nBen\t1\t2\nBen\t1\tCid\t1\n")   # the fold changed on disk
    stat = pairs.stat()
    os.utime(pairs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = site_mod.federation_identities(tmp_path, 0, preset)
    assert sorted(after) == ["Ann"]
