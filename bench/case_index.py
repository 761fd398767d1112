"""The similar-case index as the first Diagnose on a dataset builds it: every image's pooled features under the model,
computed in the app's background task (``core.inference.similar.index_in_background``) into an empty feature cache,
then read back from that cache as every later Diagnose (and a server restart) does. Writes its own section of
docs/BENCHMARKS.md (see bench/report.py).

    nice python -m bench.case_index [--data ../shared/data/ham10000-200x150] [--checkpoint checkpoints/reference.pt]
    python -m bench.case_index --max-images 200 --out /tmp/BENCHMARKS.md     # a quick proof that it works

Run it on an idle machine: the figure is what a user waits for before the similar cases appear. While it runs, the
ETA the page's bar would show is recorded at a tenth, a quarter and half of the images, beside the real remaining
time, so the section also says how honest that bar is. The load average (1 min) before and after says whether
other work shared the cores. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine
from bench.report import update_json, write_section
from core.common import settings
from core.common.formatting import format_duration
from core.data.dataset import index_dataset
from core.inference.opening import open_predictor
from core.inference.similar import index_in_background

ROOT = Path(__file__).resolve().parents[1]
OWNER = "bench/case_index.py"
CHECKPOINT = ROOT / "checkpoints" / "reference.pt"
CHECKPOINTS = (0.1, 0.25, 0.5)  # shares of the images at which the bar's ETA is recorded
POLL_S = 0.5  # how often the benchmark reads the task, as the page's fragment does every second


def build(checkpoint: Path, checkpoint_dict: dict, frame, cache: Path) -> dict:
    """One build through the app's background task: its time, and the ETA the bar showed at :data:`CHECKPOINTS`."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    task = index_in_background(checkpoint, checkpoint_dict, frame, settings.run_folders(), cache_dir=cache)
    etas: dict[float, tuple[float, float]] = {}  # share -> (when, the ETA the bar's rate gave then)
    while not task.wait(POLL_S):
        if task.total and task.done:
            share = task.done / task.total
            for mark in CHECKPOINTS:
                if share >= mark and mark not in etas:
                    rate = task.done / (time.time() - task.started)  # as core.common.formatting.progress_text
                    etas[mark] = (time.perf_counter() - start, (task.total - task.done) / rate)
                    print(f"  {task.done}/{task.total} images, ETA {format_duration(etas[mark][1])}", flush=True)
    seconds = time.perf_counter() - start
    if task.error is not None:
        sys.exit(f"error: the index could not be built: {task.error}")
    return {
        "seconds": seconds,
        "images": len(task.result.frame),
        "images_per_s": len(frame) / seconds,
        "eta": {f"{mark:.2f}": {"shown_s": eta, "actual_s": seconds - when} for mark, (when, eta) in etas.items()},
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def measure(data: Path, checkpoint: Path, max_images: int) -> dict:
    frame = index_dataset(data).frame
    if max_images:
        frame = frame.sample(n=min(max_images, len(frame)), random_state=0).reset_index(drop=True)
    checkpoint_dict = open_predictor(checkpoint).checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "features"
        print(f"first build of {len(frame)} images (empty feature cache)…", flush=True)
        first = build(checkpoint, checkpoint_dict, frame, cache)
        print("again, the features read back from the cache…", flush=True)
        again = build(checkpoint, checkpoint_dict, frame, cache)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "data": data.name,
        "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint),
        "images": len(frame),
        "full_dataset": not max_images,
        "first": first,
        "cached": again,
    }


def section(r: dict, command: str) -> list[str]:
    first, cached = r["first"], r["cached"]
    lines = [
        "## The similar-case index: the first Diagnose on a dataset",
        "",
        f"Measured {r['date']} with `{command}` on: {r['machine']}.",
        f"{r['images']:,} images of {r['data']} under `{r['checkpoint']}`, built by the app's background task "
        "(`core.inference.similar.index_in_background`): Diagnose shows its answer, heatmap and report meanwhile, "
        "and the similar cases once it is done.",
        "",
        "| build | time | images/s | load before → after |",
        "| --- | --- | --- | --- |",
        f"| first, every image's features computed | {format_duration(first['seconds'])} | "
        f"{first['images_per_s']:.1f} | {first['load_before']:.1f} → {first['load_after']:.1f} |",
        f"| again, read back from `.cache/features` (later Diagnoses, a restart) | {cached['seconds']:.1f} s | "
        f"{cached['images_per_s']:.0f} | {cached['load_before']:.1f} → {cached['load_after']:.1f} |",
    ]
    if first["eta"]:
        lines += [
            "",
            "The ETA on the page's bar (the remaining images at the rate since the build started) against the time "
            "that was really left: "
            + "; ".join(
                f"at {float(mark):.0%} it said {format_duration(e['shown_s'])}, {format_duration(e['actual_s'])} were "
                "left"
                for mark, e in first["eta"].items()
            )
            + ".",
        ]
    if not r["full_dataset"]:
        lines += ["", "A proof run on a few images: the numbers show that the script works, nothing more."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--max-images", type=int, default=0, help="a quick proof: index at most this many images")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    command = "python -m bench.case_index " + " ".join(sys.argv[1:])
    results = measure(args.data, args.checkpoint, args.max_images)
    lines = section(results, command.strip())
    write_section(args.out, OWNER, lines)
    update_json(args.out.with_suffix(".json"), {"case_index": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
