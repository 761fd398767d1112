"""Batch prediction as users run it: ``lesionlab predict checkpoints/reference.pt FOLDER --csv out.csv`` on
500 HAM10000 images, timed from the command's start to its exit (Python start-up and the model load included);
writes its own section of docs/BENCHMARKS.md (see bench/report.py).

    nice python -m bench.batch [--data ../shared/data/ham10000-200x150] [--images 500]

The images, every n-th of the dataset in file-name order, are copied into a fresh folder, as a user's export
would be. The command runs twice: with ``--no-tta`` (one pass per image) and with ``--tta`` (the views of
``core.inference.forward.TTA_SCALES``, the command line's and the Batch page's default). Not a test: the target is
reported beside the measurement, never asserted.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine
from bench.report import update_json, write_section
from core.data.dataset import index_dataset
from core.inference.forward import tta_description
from core.inference.predictor import USE_TTA_BY_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


CHECKPOINT = ROOT / "checkpoints" / "reference.pt"
TARGET_S = 60.0
TARGET_IMAGES = 500


def copy_images(data: Path, n: int, dest: Path) -> int:
    paths = sorted(index_dataset(data).frame["path"].tolist())
    chosen = paths[:: max(1, len(paths) // n)][:n]
    for path in chosen:
        shutil.copy(path, dest / Path(path).name)
    return len(chosen)


def run_cli(folder: Path, out: Path, tta: bool) -> dict:
    command = [sys.executable, "-m", "core.cli.predict", str(CHECKPOINT), str(folder), "--csv", str(out)]
    command += ["--tta"] if tta else ["--no-tta"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: the command failed (exit {result.returncode}):\n{result.stderr}")
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {
        "tta": tta,
        "seconds": seconds,
        "rows": len(rows),
        "errors": sum(bool(r["error"]) for r in rows),
        "images_per_s": len(rows) / seconds,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "summary": result.stderr.strip().splitlines()[-1],
    }


def report(results: list[dict], n: int, command: str) -> list[str]:
    lines = [
        f"## Batch prediction: {n} images through `lesionlab predict … --csv`",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} with `{command}` on: {machine()}.",
        f"{n} HAM10000 images (200×150 JPEGs, every n-th of the dataset) copied into a folder, predicted by",
        "`lesionlab predict checkpoints/reference.pt FOLDER --csv out.csv` (MobileNetV2 at 150×200, on the",
        "CPU) and timed from the command's start to its exit: Python start-up, loading the model, decoding, the",
        "batched forward passes, the Diagnose page's warnings and writing the CSV. The load average (1 min) before",
        "and after each run says whether other work shared the cores.",
    ]
    if max(r["load_before"] for r in results) > (os.cpu_count() or 1):
        lines += [
            "",
            "**Measured under load** (the load average exceeded the core count): other work had most of the CPU,",
            "so these times are far above what the command takes alone. Rerun on an idle machine before quoting.",
        ]
    lines += [
        "",
        "| run | wall time | images/s | rows (errors) | load before → after | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        name = f"`--tta` ({tta_description(True)})" if r["tta"] else "`--no-tta` (one pass per image)"
        default = r["tta"] == USE_TTA_BY_DEFAULT  # the command as a user types it: the target is for that one
        name += ", the default" if default else ""
        target = f"≤ {TARGET_S:.0f} s for {TARGET_IMAGES}" if default else ""
        lines.append(
            f"| {name} | {r['seconds']:.1f} s | {r['images_per_s']:.1f} | {r['rows']} ({r['errors']}) | "
            f"{r['load_before']:.1f} → {r['load_after']:.1f} | {target} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=TARGET_IMAGES)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    with tempfile.TemporaryDirectory(prefix="lesionlab-batch-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        n = copy_images(args.data, args.images, folder)
        results = []
        for tta in (False, True):
            results.append(run_cli(folder, Path(tmp) / "out.csv", tta))
            print(results[-1], flush=True)
    command = "python -m bench.batch" + (f" --images {args.images}" if args.images != TARGET_IMAGES else "")
    write_section(args.out, "bench/batch.py", report(results, n, command))
    update_json(args.out.with_suffix(".json"), {"batch": {"images": n, "runs": results}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
