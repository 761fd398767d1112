"""core.data.archives: uploaded zips are unpacked once, inside their folder, within bounds."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from core.data import archives
from core.data.archives import ArchiveError, open_zip, read_member, unpack_upload
from tests.conftest import patched


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


def declaring(data: bytes, count: int) -> bytes:
    """``data`` (a zip) with its end-of-central-directory record declaring ``count`` members."""
    out = bytearray(data)
    at = out.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", out, at + 8, count, count)
    return bytes(out)


GOOD = zip_of({"set/mel/a.jpg": b"\xff\xd8\xff a", "set/nv/b.jpg": b"\xff\xd8\xff b"}).getvalue()
# name: (a malformed archive, what the one error type says); every one is refused by Evaluate's unpacking and
# read member by member (Batch) with the same message.
ARCHIVE_CORPUS = {
    "encrypted member": (patched(GOOD, "set/nv/b.jpg", flags=0x1), "set/nv/b.jpg is encrypted"),
    "deflate64 member": (patched(GOOD, "set/nv/b.jpg", method=9), "set/nv/b.jpg is compressed with deflate64"),
    "unknown method": (patched(GOOD, "set/nv/b.jpg", method=77), "compressed with method 77"),
    "count past the bound": (declaring(GOOD, 60_000), "holds 60,000 files; at most 50,000 are read"),
    "count that understates": (declaring(GOOD, 1), "it declares 1 files, its central directory lists 2"),
    "not a zip": (b"PK but not really", "not a readable zip archive (no end-of-central-directory record)"),
    "cut short": (GOOD[: len(GOOD) // 2], "not a readable zip archive"),
}


@pytest.mark.parametrize("case", ARCHIVE_CORPUS)
def test_a_malformed_archive_is_one_error_type_for_every_reader(tmp_path, case):
    data, message = ARCHIVE_CORPUS[case]
    with pytest.raises(ArchiveError, match="^set.zip") as refused:
        unpack_upload(io.BytesIO(data), "set.zip", tmp_path / "cache")
    assert message in str(refused.value)
    assert not list(tmp_path.rglob("*.jpg"))  # refused before anything was written
    try:  # Batch's way: open the archive, then read each member when its turn comes
        with open_zip(io.BytesIO(data), "set.zip") as archive:
            for info in archive.infolist():
                read_member(archive, info, f"set.zip: {info.filename}", 2**20)
    except ArchiveError as exc:
        assert message in str(exc)
    else:
        pytest.fail(f"{case} was read")


def test_a_central_directory_longer_than_its_count_is_refused_before_it_is_parsed(monkeypatch, tmp_path):
    monkeypatch.setattr(archives, "MAX_MEMBERS", 3)
    five = zip_of({f"{i}.jpg": b"x" for i in range(5)}).getvalue()
    with pytest.raises(ArchiveError, match="holds more than 3 files"):
        unpack_upload(io.BytesIO(declaring(five, 3)), "five.zip", tmp_path)


def test_an_archive_opened_by_path_closes_its_file(tmp_path):
    """Given a file object, zipfile leaves it open: open_zip opens the file of a path itself (a checkpoint's every
    load), so closing the archive must close it too, not leave it to the garbage collector."""
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "a")
    with open_zip(path, "set.zip") as archive:
        fh = archive.fp
        assert archive.read("a.txt") == b"a" and not fh.closed
    assert fh.closed
    given = io.BytesIO(path.read_bytes())
    with open_zip(given, "set.zip"):
        pass
    assert not given.closed  # a caller's own file stays the caller's to close
