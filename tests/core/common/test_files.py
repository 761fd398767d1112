"""core.common.files: atomic writes that never leave half a file or a stray temporary, and forgiving reads."""

from __future__ import annotations

import stat

import pytest
import torch

from core.common.files import atomic_write, read_json, read_tail, write_json
from core.models.checkpoints import atomic_save


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "data.bin"  # the folder is created
    seen_while_writing = []

    def write(fh):
        fh.write(b"new ")
        seen_while_writing.append(path.exists())
        fh.write(b"content")

    atomic_write(path, write)
    assert path.read_bytes() == b"new content"
    assert seen_while_writing == [False]  # nothing at the destination until the whole file is written
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    write_json(path, {"state": "running"})

    def write(fh):
        fh.write(b'{"state": "fin')
        assert read_json(path) == {"state": "running"}  # readers still see the old file, whole
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert read_json(path) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


class Unsaveable:
    def __reduce__(self):
        raise RuntimeError("cannot be pickled")


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="cannot be pickled"):
        atomic_save({"epoch": 2, "w": torch.zeros(1000), "oops": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_read_json_is_none_for_missing_garbled_or_undecodable_files(tmp_path):
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"a": [1,')
    assert read_json(tmp_path / "half.json") is None
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    assert read_json(tmp_path / "binary.json") is None


def test_read_tail(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(10000)))
    assert read_tail(log, 2) == "line 9998\nline 9999"
    assert read_tail(tmp_path / "missing.log", 5) == ""
