"""``lesionlab download --dest DIR`` (``python -m core.cli.download``): HAM10000 from its Dataverse record,
resumable and verified.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.common.formatting import format_bytes
from core.data.dataset import DatasetError
from core.data.dataverse import (
    DEFAULT_SERVER,
    HAM10000_DOI,
    TIMEOUT_S,
    DownloadError,
)
from core.data.download import Progress, download_dataset, list_dataset_files


class _ProgressLine:
    """A one-line progress bar on stderr, redrawn when the percentage changes."""

    def __init__(self) -> None:
        self._last: tuple[str, str, int] | None = None

    def __call__(self, p: Progress) -> None:
        percent = int(100 * p.fraction) if p.fraction is not None else -1
        key = (p.stage, p.file, percent if percent >= 0 else p.done >> 23)  # unknown size: every 8 MiB
        if key == self._last:
            return
        self._last = key
        bar = "#" * (percent // 4) if percent >= 0 else ""
        amount = f"{percent:3d}%" if percent >= 0 else format_bytes(p.done)
        sys.stderr.write(f"\r{p.stage:8} {p.file[:40]:40} [{bar:25}] {amount}")
        if p.total is not None and p.done >= p.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionlab download",
        description="Download HAM10000 from the Harvard Dataverse (doi:10.7910/DVN/DBW86T): resumable, "
        "checksum-verified, extracted into DEST, then validated.",
    )
    parser.add_argument("--dest", type=Path, help="data folder for HAM10000 (created if missing)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"Dataverse server (default {DEFAULT_SERVER})")
    parser.add_argument("--doi", default=HAM10000_DOI, help=f"dataset persistent id (default {HAM10000_DOI})")
    parser.add_argument(
        "--external",
        action="store_true",
        help="also get the ISIC 2018 Task 3 test images and ground truth, as an external test set",
    )
    parser.add_argument(
        "--external-dest", type=Path, help="folder for the external test set (default: DEST-isic2018-test next to DEST)"
    )
    parser.add_argument(
        "--keep-archives",
        action="store_true",
        help="keep the verified zip archives in DEST/.download after extracting them",
    )
    parser.add_argument("--list", action="store_true", help="only list the dataset's files and what each is used for")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for the server (default 60)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.list and args.dest is None:
        parser.error("--dest is required (or use --list)")
    try:
        if args.list:
            for remote, role in list_dataset_files(args.server, args.doi, timeout=args.timeout):
                size = format_bytes(remote.size) if remote.size is not None else "size unknown"
                checksum = remote.checksum_type or "no checksum"
                saved_as = f" (saved as {remote.name})" if remote.name != remote.label else ""
                print(f"{remote.label:45} {size:>10}  {checksum:8} {role or 'not used'}{saved_as}")
            return 0
        summary = download_dataset(
            args.dest,
            server=args.server,
            persistent_id=args.doi,
            include_external=args.external,
            external_dest=args.external_dest,
            keep_archives=args.keep_archives,
            progress=_ProgressLine(),
            timeout=args.timeout,
        )
    except (DownloadError, DatasetError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
