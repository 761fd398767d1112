"""What a Diagnose answer costs for each model file: milliseconds per prediction with and without test-time
augmentation, and the file's size; writes its own section of docs/BENCHMARKS.md (and .json).

    python -m bench.diagnose_cost [MODEL ...] [--repeats 50] [--data ../shared/data/ham10000-200x150]

MODEL: checkpoints or ensemble files (default: the bundled checkpoints/reference.pt). Each prediction is
``Predictor.predict`` on one HAM10000 image, as the Diagnose page calls it (decode, fit, preprocess, forward,
calibrate), batch of 1, on this machine's CPU; medians and 90th percentiles after 3 warm-ups. This is the one
place the cost of test-time augmentation is measured (bench/tta.py measures which views help). Run it on an idle
machine: the load average is written beside the figures. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.benchmarks import machine
from bench.report import update_json, write_section
from core.evaluation.evaluate import index_data
from core.inference.forward import tta_description
from core.inference.opening import open_predictor
from core.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"
TARGET_MS = 300


def cost(predictor: Predictor, data: Path, repeats: int) -> dict:
    """Milliseconds per image through ``Predictor.predict`` (the Diagnose page's call: decode, preprocess, forward;
    batch of 1), without TTA and with the default views; p50 and p90 of ``repeats`` after 3 warm-up calls."""
    image = index_data(data).frame["path"].iloc[0]
    result = {}
    for tta in (False, True):
        for _ in range(3):
            predictor.predict(image, tta=tta)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.predict(image, tta=tta)
            times.append(time.perf_counter() - start)
        result[tta_description(tta)] = {
            "p50_ms": 1000 * statistics.median(times),
            "p90_ms": 1000 * float(np.percentile(times, 90)),
        }
        print("cost", tta_description(tta), result[tta_description(tta)], flush=True)
    return result


def measure(model: Path, data: Path, repeats: int) -> dict:
    predictor = open_predictor(model)
    members = getattr(predictor, "members", None)
    return {
        "model": os.path.relpath(model, ROOT) if model.resolve().is_relative_to(ROOT) else str(model),
        "arch": predictor.arch,
        "members": len(members) if members is not None else 1,
        "megabytes": model.stat().st_size / 1e6,
        "cost": cost(predictor, data, repeats),
    }


def write_report(results: dict, path: Path, command: str) -> None:
    load = max(results["load_before"], results["load_after"])
    lines = [
        "## Diagnose: milliseconds per answer, by model",
        "",
        f"Measured {results['date']} with `{command}` on {results['machine']}; load average (1 min) "
        f"{results['load_before']:.1f} before, {results['load_after']:.1f} after"
        + (" — other work shared the CPU." if load > (os.cpu_count() or 1) else "."),
        f"`Predictor.predict` on one image, batch of 1, {results['repeats']} repeats (target: ≤ {TARGET_MS} ms p50 "
        "with the default TTA for the default model).",
        "",
        "| model | networks | file | one view: p50 / p90 | default TTA: p50 / p90 |",
        "| --- | --- | --- | --- | --- |",
    ]
    off, on = tta_description(False), tta_description(True)
    for r in results["models"]:
        c = r["cost"]
        lines.append(
            f"| `{r['model']}` ({r['arch']}) | {r['members']} | {r['megabytes']:.1f} MB | "
            f"{c[off]['p50_ms']:.0f} / {c[off]['p90_ms']:.0f} ms | {c[on]['p50_ms']:.0f} / {c[on]['p90_ms']:.0f} ms |"
        )
    lines += ["", f"Default TTA: {on}."]
    write_section(path, "bench/diagnose_cost.py", lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, default=[ROOT / "checkpoints" / "reference.pt"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "repeats": args.repeats,
        "load_before": os.getloadavg()[0],
    }
    results["models"] = [measure(m, args.data, args.repeats) for m in args.models]
    results["load_after"] = os.getloadavg()[0]
    command = " ".join(["python -m bench.diagnose_cost", *sys.argv[1:]])
    write_report(results, args.out, command)
    update_json(args.out.with_suffix(".json"), {"diagnose_cost": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
