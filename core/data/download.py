"""Get HAM10000, and optionally the ISIC 2018 Task 3 test set, from the Harvard Dataverse.

    lesionlab download --dest data/ham10000 [--external] [--server URL] [--list]

Each file downloads into ``DEST/.download/NAME.part``, resuming with a Range
request after an interruption, and is checked against the checksum published in
the dataset's file metadata before it is renamed into place or extracted; only
then is the ``.part`` file removed. A failure of any kind leaves verified files
and partial downloads where they are, so running again continues where it stopped.
What was installed is recorded in ``DEST/.download/installed.json``; a rerun
skips those files.

The ISIC 2018 test set goes to its own folder (by default next to DEST), because
images below DEST without a HAM10000 metadata row would clutter its validation report.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.common.files import read_json, write_json
from core.common.formatting import format_bytes
from core.data.archives import ArchiveError, file_members, member_path
from core.data.dataset import ValidationReport, index_dataset
from core.data.dataverse import (
    DEFAULT_SERVER,
    HAM10000_DOI,
    TIMEOUT_S,
    DownloadError,
    RemoteFile,
    list_files,
    open_file,
)
from core.data.layouts import index_any

__all__ = [
    "DownloadError",
    "DownloadSummary",
    "Progress",
    "default_external_dest",
    "download_dataset",
    "list_dataset_files",
    "role_of",
]


TRAINING = "training"


EXTERNAL = "external test set"


STATE_DIR = ".download"


_MANIFEST = "installed.json"


_CHUNK = 1 << 20


# Matched against both the listed name and the original's name, case-insensitively, so that a
# re-ingested table (.tab vs .csv) or a re-upload with a suffix still counts.
_ROLES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"HAM10000[ _-]?images.*\.zip", re.IGNORECASE), TRAINING),
    (re.compile(r"HAM10000[ _-]?metadata(\.(csv|tab|tsv|txt))?", re.IGNORECASE), TRAINING),
    (re.compile(r"ISIC[ _-]?2018[ _-]?Task[ _-]?3[ _-]?Test[ _-]?(Input|Images).*\.zip", re.IGNORECASE), EXTERNAL),
    (
        re.compile(r"ISIC[ _-]?2018[ _-]?Task[ _-]?3[ _-]?Test[ _-]?GroundTruth.*\.(csv|tab|tsv|zip)", re.IGNORECASE),
        EXTERNAL,
    ),
)


_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}


@dataclass(frozen=True)
class Progress:
    """One progress report. ``stage`` is "download", "verify" or "extract"; ``done``/``total`` count bytes
    of the file named ``file`` (``total`` is None when the server does not say). Reports come often
    (every MiB, every extracted image): a UI should throttle redraws."""

    stage: str
    file: str
    done: int
    total: int | None

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


ProgressFn = Callable[[Progress], None]


@dataclass
class DownloadSummary:
    """What a download run did, and the validation reports of what is now on disk."""

    dest: Path
    external_dest: Path | None
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # installed and verified by an earlier run
    unverified: list[str] = field(default_factory=list)  # the dataset publishes no checksum for these
    notes: list[str] = field(default_factory=list)
    report: ValidationReport | None = None
    external_report: ValidationReport | None = None

    def text(self) -> str:
        lines = []
        if self.downloaded:
            lines.append(f"Downloaded and verified: {', '.join(self.downloaded)}.")
        if self.skipped:
            lines.append(f"Already present and verified: {', '.join(self.skipped)}.")
        if self.unverified:
            lines.append(f"No checksum published, checked by size only: {', '.join(self.unverified)}.")
        lines += self.notes
        if self.report is not None:
            lines += [f"HAM10000 in {self.dest}:", self.report.summary()]
        if self.external_report is not None:
            lines += [f"ISIC 2018 Task 3 test set in {self.external_dest}:", self.external_report.summary()]
        return "\n".join(lines)


def role_of(remote: RemoteFile) -> str | None:
    """TRAINING, EXTERNAL, or None for files this project does not use (e.g. segmentation masks)."""
    for pattern, role in _ROLES:
        if pattern.fullmatch(remote.label) or pattern.fullmatch(remote.name):
            return role
    return None


def list_dataset_files(
    server: str = DEFAULT_SERVER, persistent_id: str = HAM10000_DOI, *, timeout: float = TIMEOUT_S
) -> list[tuple[RemoteFile, str | None]]:
    """Every file of the dataset with its role, for showing before a download."""
    return [(remote, role_of(remote)) for remote in list_files(server, persistent_id, timeout=timeout)]


def default_external_dest(dest: str | Path) -> Path:
    """Where the ISIC 2018 test set goes unless told otherwise: ``<dest>-isic2018-test`` next to ``dest``."""
    dest = Path(dest).expanduser()
    return dest.with_name(f"{dest.name}-isic2018-test")


def download_dataset(
    dest: str | Path,
    *,
    server: str = DEFAULT_SERVER,
    persistent_id: str = HAM10000_DOI,
    include_external: bool = False,
    external_dest: str | Path | None = None,
    keep_archives: bool = False,
    progress: ProgressFn | None = None,
    timeout: float = TIMEOUT_S,
) -> DownloadSummary:
    """Download, verify and extract HAM10000 into ``dest``, then index it.

    With ``include_external`` the ISIC 2018 Task 3 test images and ground truth
    go to ``external_dest`` (default: ``<dest>-isic2018-test`` next to ``dest``).
    Raises :class:`DownloadError` for network, server, checksum and disk problems
    and :class:`core.data.dataset.DatasetError` when the result cannot be indexed.

    One function of about 60 lines because it is the download's whole order of steps (list, check space,
    fetch each file, verify, install, index), each step a call; split, the order would be harder to see.
    """
    dest = Path(dest).expanduser()
    external_root = Path(external_dest).expanduser() if external_dest else default_external_dest(dest)
    summary = DownloadSummary(dest=dest, external_dest=external_root if include_external else None)
    listing = list_dataset_files(server, persistent_id, timeout=timeout)

    training = _metadata_first(r for r, role in listing if role == TRAINING)
    if not any(_is_zip(r) for r in training) or all(_is_zip(r) for r in training):
        found = ", ".join(r.label for r, _ in listing) or "no files"
        raise DownloadError(
            f"Dataset {persistent_id} on {server} does not list the HAM10000 image archives and metadata "
            f"(it lists: {found}). The dataset may have been reorganised: see what it holds with "
            "`lesionlab download --list`."
        )
    jobs = [(remote, dest) for remote in training]
    if include_external:
        external = _metadata_first(r for r, role in listing if role == EXTERNAL)
        if external:
            jobs += [(remote, external_root) for remote in external]
        else:
            summary.notes.append(f"Dataset {persistent_id} lists no ISIC 2018 Task 3 test files; none downloaded.")
            summary.external_dest = None

    pending = []
    for remote, root in jobs:
        if _installed(remote, root):
            summary.skipped.append(remote.name)
        else:
            pending.append((remote, root))
    _check_space(pending, keep_archives)

    for remote, root in pending:
        state = root / STATE_DIR
        _mkdir(state)
        part = state / f"{remote.name}.part"
        _fetch(server, remote, part, progress, timeout)
        if not _verify(remote, part, progress):
            summary.unverified.append(remote.name)
        files = _install(remote, part, root, keep_archives, progress)
        _record(root, remote, files)
        summary.downloaded.append(remote.name)

    summary.report = index_dataset(dest).report
    if summary.external_dest is not None:
        summary.external_report = index_any(summary.external_dest).report
    return summary


def _is_zip(remote: RemoteFile) -> bool:
    return remote.name.lower().endswith(".zip")


def _metadata_first(remotes: Iterable[RemoteFile]) -> list[RemoteFile]:
    # Tables first: they take seconds, while the archives' gigabytes are where transfers fail.
    return sorted(remotes, key=_is_zip)


def _manifest(root: Path) -> dict:
    return read_json(root / STATE_DIR / _MANIFEST) or {}


def _fingerprint(remote: RemoteFile) -> str:
    return f"{remote.checksum_type}:{remote.checksum}" if remote.checksum else f"size:{remote.size}"


def _installed(remote: RemoteFile, root: Path) -> bool:
    entry = _manifest(root).get(str(remote.id))
    return bool(
        entry
        and entry.get("fingerprint") == _fingerprint(remote)
        and all((root / name).is_file() for name in entry.get("files", []))
    )


def _record(root: Path, remote: RemoteFile, files: list[str]) -> None:
    manifest = _manifest(root)
    manifest[str(remote.id)] = {"name": remote.name, "fingerprint": _fingerprint(remote), "files": files}
    path = root / STATE_DIR / _MANIFEST
    try:
        write_json(path, manifest)  # atomic: an interrupted write must not lose the record of earlier files
    except OSError as exc:
        raise _disk_error(exc, path, "") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_space(pending: Sequence[tuple[RemoteFile, Path]], keep_archives: bool) -> None:
    """Refuse to start when a filesystem cannot hold the peak of what this run writes to it.

    JPEG archives hardly compress, so an extracted archive takes about its own size
    again; the archive itself is deleted after extraction unless it is kept.
    """
    by_device: dict[int, tuple[Path, int, int]] = {}  # device -> (folder, bytes in use, peak)
    for remote, root in pending:
        if remote.size is None:
            continue
        anchor = _existing_ancestor(root)
        device = anchor.stat().st_dev
        _, used, peak = by_device.get(device, (anchor, 0, 0))
        part = root / STATE_DIR / f"{remote.name}.part"
        used += remote.size - (part.stat().st_size if part.is_file() else 0)
        if _is_zip(remote):
            used += remote.size
        peak = max(peak, used)
        if _is_zip(remote) and not keep_archives:
            used -= remote.size
        by_device[device] = (anchor, used, peak)
    for anchor, _, peak in by_device.values():
        free = shutil.disk_usage(anchor).free
        if peak > free:
            raise DownloadError(
                f"Not enough free disk space: this download needs about {format_bytes(peak)} on the disk holding "
                f"{anchor}, and {format_bytes(free)} is free. Free up space or choose another destination folder; "
                "nothing was downloaded."
            )


def _fetch(server: str, remote: RemoteFile, part: Path, progress: ProgressFn | None, timeout: float) -> None:
    have = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and have > remote.size:
        part.unlink()  # longer than the file can be: not a prefix of it
        have = 0
    if remote.size is not None and have == remote.size:
        return  # complete from an earlier run; verification decides whether it is good
    response, offset = open_file(server, remote, have, timeout=timeout)
    total = remote.size if remote.size is not None else _announced_total(response, offset)
    done = offset
    try:
        with response, part.open("ab" if offset else "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _interrupted(remote, part, done, total, str(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(Progress("download", remote.name, done, total))
    except OSError as exc:
        raise _disk_error(exc, part, f"The {format_bytes(done)} received so far are kept in {part}; ") from None
    if total is not None and done < total:
        raise _interrupted(remote, part, done, total, "the connection closed early")


def _announced_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _interrupted(remote: RemoteFile, part: Path, done: int, total: int | None, why: str) -> DownloadError:
    of = f" of {format_bytes(total)}" if total is not None else ""
    return DownloadError(
        f"The transfer of {remote.name} stopped after {format_bytes(done)}{of} ({why}). The part received is kept in "
        f"{part} and is not used until it is complete and verified: run the download again to resume it."
    )


def _verify(remote: RemoteFile, part: Path, progress: ProgressFn | None) -> bool:
    """Check ``part`` against the published checksum (False: none published, size checked only).
    A file that fails is deleted, so that the next run downloads it afresh instead of resuming garbage."""
    actual_size = part.stat().st_size
    if remote.size is not None and actual_size != remote.size:
        part.unlink()
        raise DownloadError(
            f"{remote.name} arrived with {actual_size} bytes instead of the {remote.size} the dataset lists. "
            "The download was deleted and nothing from it was installed; run the download again."
        )
    if not remote.checksum:
        return False
    algorithm = _HASHES.get((remote.checksum_type or "").upper())
    if algorithm is None:
        raise DownloadError(
            f"{remote.name} is published with a {remote.checksum_type} checksum, which this tool cannot check; "
            f"the download is kept in {part} but not installed."
        )
    digest = hashlib.new(algorithm)
    done = 0
    with part.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(Progress("verify", remote.name, done, actual_size))
    if digest.hexdigest() != remote.checksum.strip().lower():
        part.unlink()
        raise DownloadError(
            f"{remote.name} failed its {remote.checksum_type} check (expected {remote.checksum}, got "
            f"{digest.hexdigest()}): the data was damaged on the way. The download was deleted and nothing from it "
            "was installed; run the download again. If this repeats, something on the network (a proxy or "
            "filter) is altering the data."
        )
    return True


def _install(remote: RemoteFile, part: Path, root: Path, keep_archives: bool, progress: ProgressFn | None) -> list[str]:
    """Put a verified download in place; returns the installed paths relative to ``root``."""
    if not _is_zip(remote):
        try:
            os.replace(part, root / remote.name)
        except OSError as exc:
            raise _disk_error(exc, root / remote.name, f"The verified download is kept in {part}; ") from None
        return [remote.name]
    files = _extract(part, root, Path(remote.name).stem, progress)
    if keep_archives:
        os.replace(part, part.with_suffix(""))
    else:
        part.unlink()
    return files


def _extract(archive: Path, root: Path, stem: str, progress: ProgressFn | None) -> list[str]:
    """Extract a verified archive into ``root``: as it is when everything sits in one top folder,
    else into ``root/stem``. Images already extracted with the right size are skipped, so a rerun
    after a failed extraction finishes quickly."""
    name = archive.name.removesuffix(".part")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = file_members(zf)
            try:
                paths = [member_path(m.filename, name) for m in members]  # all checked before anything is written
            except ArchiveError as exc:
                raise DownloadError(str(exc)) from None
            tops = {p.parts[0] for p in paths}
            base = root if len(tops) == 1 and all(len(p.parts) > 1 for p in paths) else root / stem
            total = sum(m.file_size for m in members)
            done = 0
            for member, rel in zip(members, paths, strict=True):
                target = base / rel
                if not (target.is_file() and target.stat().st_size == member.file_size):
                    _mkdir(target.parent)
                    tmp = target.with_name(target.name + ".part")
                    try:
                        with zf.open(member) as src, tmp.open("wb") as dst:
                            shutil.copyfileobj(src, dst, _CHUNK)
                        os.replace(tmp, target)
                    except OSError as exc:
                        raise _disk_error(exc, target, f"The verified archive is kept in {archive}; ") from None
                done += member.file_size
                if progress:
                    progress(Progress("extract", name, done, total))
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise DownloadError(
            f"{name} passed its checksum but cannot be extracted ({exc}). It is kept in {archive}; report this."
        ) from None
    return [str((base / rel).relative_to(root)) for rel in paths]


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, path, "") from None


def _disk_error(exc: OSError, path: Path, kept: str) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "The disk is full"
    elif exc.errno == errno.EFBIG:
        what = "The file grew beyond what this disk or account allows"
    else:
        what = f"Cannot write {path} ({exc.strerror or exc})"
    return DownloadError(
        f"{what} while writing {path}. {kept}free up space (or choose another destination folder) and run "
        "the download again to continue."
    )
