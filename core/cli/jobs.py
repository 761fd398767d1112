"""``lesionlab jobs worker|status|stop`` (``python -m core.cli.jobs``): the app's background jobs from a
terminal, and the worker process a job runs in.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from core.app.jobs import active_job, stop_job, worker
from core.common.runs import (
    list_runs,
)


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="lesionlab jobs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run a job file's configs one after another (started by the app)")
    w.add_argument("job_file", type=Path)
    s = sub.add_parser("status", help="show the active job and the runs")
    s.add_argument("--runs", type=Path, default=None)
    sub.add_parser("stop", help="stop the active job").add_argument("--runs", type=Path, default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "worker":
        return worker(args.job_file)
    from core.common.settings import runs_dir as default_runs

    runs = args.runs or default_runs()
    if args.cmd == "stop":
        print("stop requested" if stop_job(runs) else "no job is running")
        return 0
    job = active_job(runs)
    print(f"active job: {job.id} ({job.kind}) runs {', '.join(job.runs)}" if job else "no job is running")
    for run in list_runs(runs, job):
        print(f"{run.name:40s} {run.state:12s} {len(run.epochs)}/{run.total_epochs or '?'} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
