"""Soak: the Diagnose page's work for one upload, 1,000 times in one process; writes its own section of
docs/BENCHMARKS.md (see bench/report.py).

    nice python -m bench.soak [--data ../shared/data/ham10000-200x150] [--iterations 1000]

Every iteration does, without Streamlit, what pages/views/diagnose.py does for a new upload with its
default settings: predict from the uploaded bytes, check that the image looks dermoscopic, draw the
probability bars, compute Grad-CAM for the predicted class and lay it over the image, and tile the
feature maps of the layer the page shows first. The uploads cycle through 50 HAM10000 images as stored
(200×150) and 5 of them re-encoded at 600×450, the size of the original dermoscopy a user would upload.

The app serves every upload from one long-lived process, so memory that an upload leaves behind
accumulates. The resident set (VmRSS) is read after a warm-up of 50 iterations (the model, the libraries'
caches and the allocator's pools settle) and at the end; the growth between them is the figure to watch.
Not a test: the target is reported next to the measurement, never asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine, rss_bytes
from bench.report import write_section
from core.app import plots
from core.data.dataset import index_dataset
from core.inference.explain import feature_map_grid, overlay
from core.inference.opening import open_predictor
from core.inference.predictor import Predictor
from core.inference.unfamiliar import dermoscopy_check

ROOT = Path(__file__).resolve().parents[1]


CHECKPOINT = ROOT / "checkpoints" / "reference.pt"
WARM_UP = 50
IMAGES = 50
UPLOAD_SIZED = 5
UPLOAD_SIZE = (600, 450)
RSS_TARGET_MB = 50


def rss_mb() -> float:
    """This process's resident set size in MB."""
    return rss_bytes(os.getpid()) / 2**20


def uploads(data: Path) -> list[bytes]:
    """The files' bytes as an upload delivers them: every ``IMAGES // n``-th image of the dataset, and the
    first ``UPLOAD_SIZED`` of them upscaled to the original dermoscopy size and re-encoded as JPEG."""
    paths = index_dataset(data).frame["path"].tolist()
    chosen = paths[:: len(paths) // IMAGES][:IMAGES]
    stored = [Path(p).read_bytes() for p in chosen]
    resized = []
    for raw in stored[:UPLOAD_SIZED]:
        out = io.BytesIO()
        Image.open(io.BytesIO(raw)).resize(UPLOAD_SIZE, Image.Resampling.LANCZOS).save(out, "JPEG", quality=92)
        resized.append(out.getvalue())
    return stored + resized


def diagnose(predictor: Predictor, upload: bytes, layer: str) -> None:
    """pages/views/diagnose.py for one new upload at its defaults, less the drawing."""
    prediction = predictor.predict(upload)
    dermoscopy_check(prediction.image)
    plots.probability_bars(prediction.probs, highlight=prediction.top_class)
    heat = predictor.explain(prediction, "gradcam", prediction.top_class)
    overlay(prediction.image, heat, 0.45)
    feature_map_grid(predictor.feature_maps(prediction, layer), n=16)


def soak(data: Path, iterations: int) -> dict:
    predictor = open_predictor(CHECKPOINT)
    layers = predictor.layer_names()
    layer = layers[len(layers) // 2]  # the page's first choice
    files = uploads(data)
    seconds, rss = [], {}
    for i in range(1, iterations + 1):
        start = time.perf_counter()
        diagnose(predictor, files[i % len(files)], layer)
        seconds.append(time.perf_counter() - start)
        if i == WARM_UP or i % 100 == 0 or i == iterations:
            rss[i] = rss_mb()
            print(f"{i:5d}  {rss[i]:7.1f} MB  {1000 * statistics.median(seconds[-50:]):5.0f} ms", flush=True)
    return {
        "iterations": iterations,
        "files": len(files),
        "rss_mb": rss,
        "growth_mb": rss[iterations] - rss[WARM_UP],
        "median_ms": 1000 * statistics.median(seconds[WARM_UP:]),
        "load": os.getloadavg()[0],
    }


def report(result: dict, command: str) -> str:
    r = result
    trend = ", ".join(f"{i}: {mb:.0f}" for i, mb in r["rss_mb"].items())
    return "\n".join(
        [
            f"## Soak: {r['iterations']:,} Diagnose uploads in one process",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} with `{command}` on: {machine()}; load average"
            f" {r['load']:.1f} at the end (other processes on the same cores lengthen the time per upload).",
            "Each iteration is the Diagnose page's work for a new upload, on the CPU with `checkpoints/reference.pt`",
            "(MobileNetV2 at 150×200): prediction from the uploaded bytes, dermoscopy check, probability bars,",
            "Grad-CAM with its overlay and the feature-map grid of the middle layer. The uploads cycle through",
            f"{r['files']} files: {IMAGES} HAM10000 images as stored (200×150) and {UPLOAD_SIZED} of them re-encoded"
            f" at {UPLOAD_SIZE[0]}×{UPLOAD_SIZE[1]}.",
            "",
            "| what | measured | target |",
            "| --- | --- | --- |",
            f"| resident memory after the {WARM_UP}-upload warm-up | {r['rss_mb'][WARM_UP]:.0f} MB | |",
            f"| resident memory after {r['iterations']:,} uploads | {r['rss_mb'][r['iterations']]:.0f} MB | |",
            f"| growth after the warm-up | {r['growth_mb']:+.1f} MB | < {RSS_TARGET_MB} MB |",
            f"| time per upload (median after the warm-up) | {r['median_ms']:.0f} ms | |",
            "",
            f"Resident memory (MB) by upload: {trend}.",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    if args.iterations <= WARM_UP:
        sys.exit(f"error: --iterations must be more than the {WARM_UP}-upload warm-up")
    result = soak(args.data, args.iterations)
    command = "python -m bench.soak" + (f" --iterations {args.iterations}" if args.iterations != 1000 else "")
    write_section(args.out, "bench/soak.py", report(result, command).splitlines())
    print(f"RSS growth {result['growth_mb']:+.1f} MB, {result['median_ms']:.0f} ms per upload; wrote {args.out}")


if __name__ == "__main__":
    main()
