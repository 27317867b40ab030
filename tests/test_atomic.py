"""minusface.atomic.write_atomic: all or nothing, exact modes from the first byte, no-clobber
placement and a kept previous file."""

from __future__ import annotations

import os
import stat

import pytest

from minusface.atomic import write_atomic


def test_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    write_atomic(target, lambda f: f.write(b"new contents"))
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_private_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "private", lambda f: f.write(b"x"), mode=0o600)
        write_atomic(tmp_path / "shared", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o666


def test_an_exact_mode_survives_a_restrictive_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "cert", lambda f: f.write(b"x"), mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cert").stat().st_mode) == 0o644


def test_no_replace_keeps_an_existing_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.png"
    write_atomic(target, lambda f: f.write(b"first"), replace=False)
    with pytest.raises(FileExistsError, match="not replaced"):
        write_atomic(target, lambda f: f.write(b"second"), replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_no_replace_without_hard_links_still_refuses(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "f.png"
    write_atomic(target, lambda f: f.write(b"first"), replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(target, lambda f: f.write(b"second"), replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_backup_keeps_the_replaced_file(tmp_path):
    target, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    write_atomic(target, lambda f: f.write(b"round 1"), backup=previous)
    assert not previous.exists()                       # nothing replaced yet
    write_atomic(target, lambda f: f.write(b"round 2"), backup=previous)
    assert (target.read_bytes(), previous.read_bytes()) == (b"round 2", b"round 1")
