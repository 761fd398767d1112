"""core.data.archives: uploaded zips are unpacked once, inside their folder, within bounds."""

from __future__ import annotations

import io
import zipfile

import pytest

from core.data import archives
from core.data.archives import ArchiveError, unpack_upload


def zip_of(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def test_an_upload_is_unpacked_once_into_the_folder_that_holds_its_data(tmp_path):
    files = {"testset/mel/a.jpg": b"\xff\xd8\xff a", "testset/nv/b.jpg": b"\xff\xd8\xff b", "__MACOSX/x": b"fork"}
    root = unpack_upload(zip_of(files), "set.zip", tmp_path)
    assert root.name == "testset" and root.parent.parent == tmp_path
    assert (root / "mel" / "a.jpg").read_bytes() == b"\xff\xd8\xff a"
    assert not list(tmp_path.rglob("x"))  # macOS resource forks are left out
    (root / "mel" / "a.jpg").write_bytes(b"changed")
    assert unpack_upload(zip_of(files), "set.zip", tmp_path) == root  # the same upload: not unpacked again
    assert (root / "mel" / "a.jpg").read_bytes() == b"changed"


def test_a_set_of_one_class_folder_keeps_that_folder(tmp_path):
    root = unpack_upload(zip_of({"mel/a.jpg": b"a", "mel/b.jpg": b"b"}), "mel.zip", tmp_path)
    assert (root / "mel").is_dir()


@pytest.mark.parametrize("name", ["../escaped.jpg", "/etc/escaped.jpg", "C:/escaped.jpg"])
def test_an_unsafe_path_stops_the_unpacking_before_anything_is_written(tmp_path, name):
    with pytest.raises(ArchiveError, match="unsafe path"):
        unpack_upload(zip_of({"ok.jpg": b"fine", name: b"evil"}), "evil.zip", tmp_path / "cache")
    assert not list(tmp_path.rglob("*.jpg"))


def test_bounds_on_members_and_unpacked_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBERS", 2)
    with pytest.raises(ArchiveError, match="holds 3 files; at most 2"):
        unpack_upload(zip_of({f"{i}.jpg": b"x" for i in range(3)}), "many.zip", tmp_path)
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 1000)
    bomb = zip_of({"zeros.jpg": bytes(10_000)})  # compresses to a few bytes
    with pytest.raises(ArchiveError, match="would unpack to"):
        unpack_upload(bomb, "bomb.zip", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-unpacked is kept


def test_not_a_zip(tmp_path):
    with pytest.raises(ArchiveError, match="not a readable zip archive"):
        unpack_upload(io.BytesIO(b"PK but not really"), "fake.zip", tmp_path)
