"""What open but idle browser tabs cost the server: a classroom leaves many tabs open on one machine.

    python -m bench.idle_tabs [--tabs 0 1 4 16] [--seconds 20]

Starts ``streamlit run streamlit_app.py`` on loopback (the bundled sample as the dataset, an empty runs
folder), opens N tabs on Home in headless Chromium (/usr/bin/chromium, through Playwright; each tab a session of
its own), waits until every page has finished drawing, then reads the server process's CPU time over
``--seconds`` of doing nothing. Then the same with a training job present (a sleeping process holding the job
files, as the app sees a job): while a job exists every tab watches it once a second. Writes its section of
docs/BENCHMARKS.md (target: an idle tab ≤ 1 % of a core when no job runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_OUT, cpu_seconds, machine
from bench.page_loads import FINISHED
from bench.report import write_section
from core.common.settings import DATA_ENV, DEFAULT_DATASET, RUNS_ENV
from tests.app_support import CHROMIUM, CHROMIUM_ARGS, TITLES, clean_env, fake_job, streamlit_server

TARGET_PERCENT = 1.0
SETTLE_S = 3.0  # after the last page finished drawing: the sessions' first fragment runs and caches settle


def server_percent(browser, server, tabs: int, seconds: float) -> float:
    """The server's CPU use, in % of one core, with ``tabs`` idle tabs open on Home."""
    contexts = [browser.new_context() for _ in range(tabs)]
    try:
        for context in contexts:
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(server.url, wait_until="commit")
            page.get_by_role("heading", name=TITLES["home"], exact=True).first.wait_for()
            page.wait_for_function(FINISHED, polling=100)
        time.sleep(SETTLE_S)
        start = cpu_seconds(server.pid)
        time.sleep(seconds)
        return 100 * (cpu_seconds(server.pid) - start) / seconds
    finally:
        for context in contexts:
            context.close()


def measure(tab_counts: list[int], seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    results: dict[str, dict[int, float]] = {"no job": {}, "a job running": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        env = {**clean_env(), DATA_ENV: str(DEFAULT_DATASET), RUNS_ENV: str(runs)}
        with streamlit_server(env, Path(tmp) / "server.log") as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                server_percent(browser, server, 1, 0.1)  # the server's first request imports every page's libraries
                for n in tab_counts:
                    results["no job"][n] = server_percent(browser, server, n, seconds)
                    print(f"no job, {n} idle tabs: server {results['no job'][n]:.1f} % of a core", flush=True)
                holder = fake_job(runs, "watched")
                try:
                    for n in [n for n in tab_counts if n <= 4]:
                        results["a job running"][n] = server_percent(browser, server, n, seconds)
                        print(f"a job, {n} idle tabs: server {results['a job running'][n]:.1f} %", flush=True)
                finally:
                    holder.kill()  # a lock whose process is gone is no job
                    holder.wait()
            finally:
                browser.close()
    return results


def report(results: dict, seconds: float, command: str) -> list[str]:
    base = results["no job"].get(0)
    lines = [
        "## Idle tabs: what the server spends on open pages nobody touches",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} with `{command}` on: {machine()}; load average (1 min) "
        f"{os.getloadavg()[0]:.1f} at the end (the browser's own processes share the cores). "
        "`streamlit run` on loopback, N tabs left on Home in headless Chromium, each its own session; the "
        f"server process's CPU time over {seconds:g} s after every page finished drawing, in % of one core. "
        "With a job present each tab watches the job files once a second (its sidebar line and the reruns that "
        "follow the job); with none, nothing runs.",
        "",
        "| idle tabs | server CPU, no job | per tab, no job | server CPU, a job running | target per tab, no job |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, percent in results["no job"].items():
        per_tab = "—" if n == 0 or base is None else f"{(percent - base) / n:.2f} %"
        job = results["a job running"].get(n)
        lines.append(
            f"| {n} | {percent:.2f} % | {per_tab} | {'—' if job is None else f'{job:.2f} %'} | ≤ {TARGET_PERCENT:g} % |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tabs", type=int, nargs="+", default=[0, 1, 4, 16])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"error: no Chromium at {CHROMIUM} (Debian's chromium package)")
    if min(args.tabs) < 0 or max(args.tabs) > 32 or args.seconds <= 0:
        sys.exit("error: --tabs between 0 and 32, --seconds above 0")
    results = measure(args.tabs, args.seconds)
    command = "python -m bench.idle_tabs" + (
        "" if args.tabs == [0, 1, 4, 16] else " --tabs " + " ".join(map(str, args.tabs))
    )
    write_section(args.out, "bench/idle_tabs.py", report(results, args.seconds, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
