"""Zip archives opened and unpacked safely: the dataset download's archives, the external test sets uploaded to the
app, Batch's archives and the torch files checkpoints are.

An archive's member count is read from its end-of-central-directory record, and the central directory's entries
counted in place, before :mod:`zipfile` builds an object per entry (:func:`open_zip`): a small archive that
declares a million entries costs a refusal, not gigabytes. Every member's path is checked before anything is
written (no absolute paths, no ``..``, no drive letters), and an upload's archive is bounded in members and
unpacked bytes, counted as they are written, so a zip bomb or a lying header stops at the bound rather than
filling the disk. A member that cannot be read (encrypted, a compression method Python lacks such as deflate64,
damaged) raises :class:`ArchiveError` like every other refusal here (:func:`read_member`).
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.data.layouts import diagnosis_code

MAX_UPLOAD_MB = 200  # the External tab's upload limit (Streamlit holds an upload in memory)
MAX_UNPACKED_BYTES = 2 * 1024**3  # an image set of 200 MB compressed; JPEGs barely compress
MAX_MEMBERS = 50_000  # ISIC 2018 Task 3's test set: 1,512 images
# A central directory entry is 46 bytes plus its name, extra field and comment: real ones take under 200 bytes
# (names of a few path components, a timestamp extra field). Bounded per declared member before it is read.
MAX_ENTRY_BYTES = 1024
# The compression methods zipfile unpacks: stored, deflate, bzip2, lzma.
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_METHOD_NAMES = {9: "deflate64", 6: "implode", 93: "zstandard", 95: "xz", 98: "ppmd", 99: "AES encryption"}
_EOCD = struct.Struct("<4sHHHHIIH")  # the end-of-central-directory record
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL_ENTRY = struct.Struct("<4s24xHHH12x")  # signature, then the name, extra and comment lengths
_CHUNK = 1 << 20
_DONE = ".unpacked"  # written last: a folder without it is a partial unpacking, redone


class ArchiveError(ValueError):
    """An archive that cannot or must not be unpacked; the message says why."""


def member_path(name: str, archive_name: str) -> PurePosixPath:
    """The member ``name`` as a relative path; ArchiveError when it would land outside the folder unpacked into."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise ArchiveError(
            f"{archive_name} contains the unsafe path {name!r}, which would land outside the data folder. "
            "Nothing was extracted from it; the archive is not what the dataset should hold."
        )
    return path


def _central_directory(fh: BinaryIO, name: str) -> tuple[int, int, int]:
    """(declared member count, central directory offset, its size in bytes), from the end-of-central-directory
    record (the zip64 one when the archive has it), reading only the file's tail."""
    fh.seek(0, 2)
    size = fh.tell()
    tail_length = min(size, _EOCD.size + 0xFFFF)  # the record, then a comment of at most 64 KiB
    fh.seek(size - tail_length)
    tail = fh.read(tail_length)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ArchiveError(f"{name} is not a readable zip archive (no end-of-central-directory record).")
    _, _, _, _, count, cd_size, _, _ = _EOCD.unpack_from(tail, at)
    record_at = size - tail_length + at
    if at >= _EOCD64_LOCATOR.size and tail[at - _EOCD64_LOCATOR.size : at].startswith(b"PK\x06\x07"):
        _, _, zip64_at, _ = _EOCD64_LOCATOR.unpack_from(tail, at - _EOCD64_LOCATOR.size)
        fh.seek(zip64_at)
        record = fh.read(_EOCD64.size)
        if len(record) < _EOCD64.size or not record.startswith(b"PK\x06\x06"):
            raise ArchiveError(f"{name} is not a readable zip archive (a damaged zip64 record).")
        count, cd_size = _EOCD64.unpack(record)[7:9]
        record_at = zip64_at
    # As zipfile finds it: right before the record, whatever the stored offset says (data may precede the zip).
    return count, record_at - cd_size, cd_size


def _count_entries(directory: bytes, limit: int) -> int:
    """How many entries the central directory bytes hold, stopping past ``limit``."""
    pos = count = 0
    while pos + _CENTRAL_ENTRY.size <= len(directory) and count <= limit:
        signature, name_len, extra_len, comment_len = _CENTRAL_ENTRY.unpack_from(directory, pos)
        if signature != b"PK\x01\x02":
            break
        pos += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len
        count += 1
    return count


class _ZipOfOwnFile(zipfile.ZipFile):
    """A ZipFile that closes the file :func:`open_zip` opened for it: given a file object, zipfile leaves it open."""

    def close(self) -> None:
        fh = self.fp
        try:
            super().close()
        finally:
            if fh is not None:
                fh.close()


def open_zip(source: str | Path | BinaryIO, name: str, *, max_members: int = MAX_MEMBERS) -> zipfile.ZipFile:
    """The zip archive ``source`` (a path or a seekable binary file), once its end-of-central-directory record
    declares at most ``max_members`` entries in at most ``MAX_ENTRY_BYTES`` each and its central directory holds
    no more than that; :class:`ArchiveError` saying why not, before :mod:`zipfile` parses anything."""
    fh = open(source, "rb") if isinstance(source, str | Path) else source  # noqa: SIM115 — the ZipFile owns it
    try:
        count, cd_at, cd_size = _central_directory(fh, name)
        if count > max_members:
            raise ArchiveError(f"{name} holds {count:,} files; at most {max_members:,} are read.")
        if cd_size > (count + 1) * MAX_ENTRY_BYTES or cd_at < 0:
            raise ArchiveError(
                f"{name} is not a readable zip archive (its central directory of {cd_size:,} bytes does not fit "
                f"{count:,} files)."
            )
        fh.seek(cd_at)
        found = _count_entries(fh.read(cd_size), max_members)
        if found > max_members:
            raise ArchiveError(f"{name} holds more than {max_members:,} files; at most {max_members:,} are read.")
        if found != count:
            raise ArchiveError(
                f"{name} is not a readable zip archive (it declares {count:,} files, its central directory "
                f"lists {found:,})."
            )
        fh.seek(0)
        return zipfile.ZipFile(fh) if fh is source else _ZipOfOwnFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, struct.error) as exc:
        if fh is not source:
            fh.close()
        raise ArchiveError(f"{name} is not a readable zip archive ({exc}).") from None
    except ArchiveError:
        if fh is not source:
            fh.close()
        raise


def check_readable(info: zipfile.ZipInfo, name: str) -> None:
    """:class:`ArchiveError` for a member that cannot be unpacked here: encrypted, or compressed with a method
    Python lacks (deflate64, the default of Windows' "Send to" for large files, among them)."""
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{name} is encrypted; unpack it with its password and archive it again without one.")
    if info.compress_type not in READABLE_METHODS:
        method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        raise ArchiveError(
            f"{name} is compressed with {method}, which cannot be unpacked here; archive it again with ordinary "
            "(deflate) compression."
        )


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int) -> Iterator[bytes]:
    """The member's bytes in chunks, at most ``limit`` + 1 of them (a header that understates the size stops
    one byte past), every failure to unpack an :class:`ArchiveError`."""
    check_readable(info, name)
    left = limit + 1
    try:
        with zf.open(info) as src:
            while left > 0 and (chunk := src.read(min(_CHUNK, left))):
                left -= len(chunk)
                yield chunk
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error, OSError) as exc:
        # RuntimeError: encrypted after all; NotImplementedError: a method zipfile lacks; zlib.error: damaged data.
        raise ArchiveError(f"{name} cannot be unpacked ({type(exc).__name__}: {exc}).") from None


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int) -> bytes:
    """The member ``info`` whole, read no further than ``limit`` + 1 bytes (the caller refuses a longer one);
    :class:`ArchiveError` when it cannot be unpacked."""
    return b"".join(_chunks(zf, info, name, limit))


def file_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    # macOS adds __MACOSX/ resource forks that only look like images.
    return [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]


def unpack_upload(data: BinaryIO, name: str, cache: Path) -> Path:
    """Unpack an uploaded zip into ``cache/<its SHA-256>/`` (once: the same upload again reuses it) and return
    the folder that holds the data: the archive's single top folder when it has one."""
    digest = hashlib.sha256()
    data.seek(0)
    for chunk in iter(lambda: data.read(_CHUNK), b""):
        digest.update(chunk)
    dest = Path(cache) / digest.hexdigest()[:16]
    if not (dest / _DONE).is_file():
        shutil.rmtree(dest, ignore_errors=True)
        try:
            _unpack(data, name, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        (dest / _DONE).touch()
    return data_root(dest)


def _unpack(data: BinaryIO, name: str, dest: Path) -> None:
    with open_zip(data, name, max_members=MAX_MEMBERS) as zf:
        members = file_members(zf)
        paths = [member_path(m.filename, name) for m in members]  # all checked before anything is written
        for member in members:
            check_readable(member, f"{name}: {member.filename}")
        declared = sum(m.file_size for m in members)
        if declared > MAX_UNPACKED_BYTES:
            raise ArchiveError(
                f"{name} would unpack to {declared / 1024**2:,.0f} MB; at most {MAX_UNPACKED_BYTES // 1024**2:,} "
                "MB are unpacked. Unpack it on the server and give its folder instead."
            )
        written = 0
        for member, rel in zip(members, paths, strict=True):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                for chunk in _chunks(zf, member, f"{name}: {member.filename}", MAX_UNPACKED_BYTES):
                    written += len(chunk)
                    if written > min(declared, MAX_UNPACKED_BYTES):
                        raise ArchiveError(f"{name} unpacks to more than its header says; nothing is kept.")
                    out.write(chunk)


def data_root(folder: Path) -> Path:
    """``folder``, or the one folder inside it when it holds nothing else (a zip of ``testset/``), unless that
    folder is named for a class (a set of one class folder)."""
    entries = [e for e in folder.iterdir() if e.name not in (_DONE, "__MACOSX") and not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and diagnosis_code(entries[0].name) is None:
        return data_root(entries[0])
    return folder
