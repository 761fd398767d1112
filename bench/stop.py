"""How long Stop takes, as the app's Stop button does it; writes its section of docs/BENCHMARKS.md.

    python -m bench.stop [--data ../shared/data/ham10000-200x150] [--repeats 3]

Each measurement starts a real training job the way the Train page does (``core.app.jobs.start_training``: a
worker process and the trainer under it), waits until the run is inside the step being measured, then asks
it to stop with ``core.app.jobs.stop_job`` (what the button calls) and times two moments: when the run's record
says "stopped" (what the page shows), and when the job has ended and a new one may start. Steps measured:

* computing the backbone features of a head-only run, on an empty feature cache;
* building the decoded-image cache of a full fine-tuning run, on an empty cache;
* a training epoch of full fine-tuning (the reference preset's recipe at 150×200).

Weights are random (``weights none``): the stop's latency does not depend on their values. The issue's target
is 5 s; it is reported beside the measurement, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_DATA, machine
from bench.report import update_json, write_section
from core.app import jobs as app_jobs
from core.common.runs import read_run
from core.training.config import config_with

ROOT = Path(__file__).resolve().parents[1]


OWNER = "bench/stop.py"
TARGET_S = 5.0


def _in_step(runs: Path, step: str) -> bool:
    job = app_jobs.active_job(runs)
    if job is None or not job.current_run:
        return False
    run = read_run(runs / job.current_run, job)
    p = run.progress or {}
    if step in ("features", "decoding"):
        return run.phase == step and int(p.get("done", 0)) > 0
    return run.phase is None and int(p.get("step", 0)) > 0  # inside an epoch, past its first batch


def stop_once(data: Path, step: str, work: Path) -> dict:
    """One job started, stopped inside ``step``; seconds until the record says stopped and the job ended."""
    runs = work / "runs"
    os.environ["LESIONLAB_CACHE"] = str(work / "cache")  # an empty feature cache, inherited by the worker
    if step == "features":
        cfg = config_with("seed", arch="mobilenet_v2", weights="none", epochs=1)
    else:
        cfg = config_with("reference", weights="none", epochs=1, decoded_dir=str(work / "decoded"))
    app_jobs.start_training({**cfg.to_dict(), "data": str(data), "out": str(runs), "name": f"stop-{step}"}, runs)
    deadline = time.monotonic() + 600
    while not _in_step(runs, step):
        if time.monotonic() > deadline or app_jobs.active_job(runs) is None:
            sys.exit(f"error: the job never reached {step}; see {runs}")
        time.sleep(0.05)
    asked = time.monotonic()
    app_jobs.stop_job(runs)
    recorded = None
    while app_jobs.active_job(runs) is not None:
        if recorded is None and read_run(runs / f"stop-{step}").state == "stopped":
            recorded = time.monotonic() - asked
        time.sleep(0.05)
    ended = time.monotonic() - asked
    state = read_run(runs / f"stop-{step}").state
    if state != "stopped":
        sys.exit(f"error: the run ended {state}, not stopped; see {runs}")
    return {"recorded_s": recorded if recorded is not None else ended, "ended_s": ended}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    results = {}
    for step in ("features", "decoding", "epoch"):
        tries = []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="lesionlab-stop-") as tmp:
                tries.append(stop_once(args.data, step, Path(tmp)))
            print(step, i, tries[-1], flush=True)
        results[step] = {
            "recorded_s": statistics.median(t["recorded_s"] for t in tries),
            "ended_s": statistics.median(t["ended_s"] for t in tries),
            "worst_ended_s": max(t["ended_s"] for t in tries),
        }
    load_after = os.getloadavg()[0]
    labels = {
        "features": "computing backbone features (head-only run, mobilenet_v2 at 224, empty cache)",
        "decoding": "building the decoded-image cache (reference recipe, empty cache)",
        "epoch": "a full fine-tuning epoch (reference recipe, 150×200, batch 32, decoded cache)",
    }
    lines = [
        "## Stop, as the Train page's button does it",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python -m bench.stop --repeats {args.repeats}` on: "
        f"{machine()}; load average (1 min) {load_before:.1f} before, {load_after:.1f} after (its own jobs "
        "included).",
        "A real job (worker and trainer processes) on the full dataset is stopped with `core.app.jobs.stop_job` "
        "once the run is inside the step; *recorded*: the run's record says stopped, what the page shows; "
        "*ended*: the job's processes have exited and a new job may start. Medians of the repeats.",
        "",
        "| stopped during | recorded | ended | slowest ended | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for step, r in results.items():
        lines.append(
            f"| {labels[step]} | {r['recorded_s']:.1f} s | {r['ended_s']:.1f} s | {r['worst_ended_s']:.1f} s "
            f"| ≤ {TARGET_S:.0f} s |"
        )
    write_section(args.out, OWNER, lines)
    update_json(args.out.with_suffix(".json"), {"stop": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
