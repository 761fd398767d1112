"""Zip archives unpacked safely: the dataset download's archives and the external test sets uploaded to the app.

Every member's path is checked before anything is written (no absolute paths, no ``..``, no drive letters), and
an upload's archive is bounded in members and unpacked bytes, counted as they are written, so a zip bomb or a
lying header stops at the bound rather than filling the disk.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.data.layouts import diagnosis_code

MAX_UPLOAD_MB = 200  # the External tab's upload limit (Streamlit holds an upload in memory)
MAX_UNPACKED_BYTES = 2 * 1024**3  # an image set of 200 MB compressed; JPEGs barely compress
MAX_MEMBERS = 50_000  # ISIC 2018 Task 3's test set: 1,512 images
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
    data.seek(0)
    try:
        with zipfile.ZipFile(data) as zf:
            members = file_members(zf)
            paths = [member_path(m.filename, name) for m in members]  # all checked before anything is written
            if len(members) > MAX_MEMBERS:
                raise ArchiveError(f"{name} holds {len(members):,} files; at most {MAX_MEMBERS:,} are unpacked.")
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
                with zf.open(member) as src, open(target, "wb") as out:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):  # noqa: B023 — read now, in this iteration
                        written += len(chunk)
                        if written > min(declared, MAX_UNPACKED_BYTES):
                            raise ArchiveError(f"{name} unpacks to more than its header says; nothing is kept.")
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise ArchiveError(f"{name} is not a readable zip archive ({exc}).") from None


def data_root(folder: Path) -> Path:
    """``folder``, or the one folder inside it when it holds nothing else (a zip of ``testset/``), unless that
    folder is named for a class (a set of one class folder)."""
    entries = [e for e in folder.iterdir() if e.name not in (_DONE, "__MACOSX") and not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and diagnosis_code(entries[0].name) is None:
        return data_root(entries[0])
    return folder
