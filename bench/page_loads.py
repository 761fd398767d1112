"""How fast each page of the app first paints, in a real browser; writes its own section of docs/BENCHMARKS.md
(see bench/report.py).

    python -m bench.page_loads [--data ../shared/data/ham10000-200x150] [--loads 5]

Starts ``streamlit run streamlit_app.py`` on loopback (the dataset ``--data``, this checkout's runs, published
runs and checkpoints) and opens every page in headless Chromium (/usr/bin/chromium, through Playwright), each
load in a fresh browser session, as a new visitor meets it. Two times per load, from the request:

- *heading*: the page's main heading is on screen (first paint);
- *complete*: the page's script has finished its run (every chart and table of the open view sent).

The server's very first request pays for the imports every page shares and is reported on its own; then each
page's first load (which fills its Streamlit caches: the dataset index, a run's predictions) and the median
of ``--loads`` further loads. Not a
test: the target (first paint within 2 s on the 2-core machine) is reported next to the measurement.
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

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine
from bench.report import write_section
from core.common.settings import DATA_ENV, DEFAULT_DATASET
from tests.app_support import CHROMIUM, CHROMIUM_ARGS, TITLES, clean_env, streamlit_server

TARGET_S = 2.0
VIEWPORT = {"width": 1600, "height": 1000}
FINISHED = (
    "() => { const a = document.querySelector('[data-testid=stApp]');"
    " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }"
)


def load(browser, url: str, title: str) -> tuple[float, float]:
    """(seconds to the heading, seconds to the end of the script's run) for one load in a fresh session."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        pg = context.new_page()
        pg.set_default_timeout(120_000)
        start = time.perf_counter()
        pg.goto(url, wait_until="commit")
        pg.get_by_role("heading", name=title, exact=True).first.wait_for()
        heading = time.perf_counter() - start
        pg.wait_for_function(FINISHED, polling=50)
        return heading, time.perf_counter() - start
    finally:
        context.close()


def measure(data: Path, loads: int) -> dict:
    from playwright.sync_api import sync_playwright

    env = {**clean_env(), DATA_ENV: str(data)}
    results = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, streamlit_server(env, Path(tmp) / "server.log") as server:
        url = server.url
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                # The server's first request imports the app's libraries (torch among them) for every page after.
                server_first = load(browser, url, TITLES["home"])
                for page, title in TITLES.items():
                    address = f"{url}/{'' if page == 'home' else page}"
                    first = load(browser, address, title)
                    later = [load(browser, address, title) for _ in range(loads)]
                    results[page] = {
                        "title": title,
                        "first": first,
                        "heading": statistics.median(h for h, _ in later),
                        "complete": statistics.median(c for _, c in later),
                    }
                    print(f"{title}: first {first[0]:.2f}/{first[1]:.2f} s, then {results[page]['heading']:.2f} s")
            finally:
                browser.close()
    return {
        "server_first": server_first,
        "pages": results,
        "loads": loads,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def report(result: dict, data: Path, command: str) -> list[str]:
    def s(x: float) -> str:
        return f"{x:.2f} s"

    lines = [
        "## First load of every page, in a browser",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} with `{command}` on: {machine()}; load average "
        f"(1 min) {result['load_before']:.1f} before, {result['load_after']:.1f} after (the server and the "
        "browser included).",
        f"`streamlit run` on loopback with the dataset `{data.name}`, this checkout's runs, the published runs and "
        f"checkpoints; headless Chromium at {VIEWPORT['width']}×{VIEWPORT['height']}, every load a fresh session. "
        "*Heading*: the page's title is on screen; *complete*: the script's run has ended. A page's first load "
        "fills its Streamlit caches (the dataset index, a run's predictions); the other columns are medians of "
        f"{result['loads']} loads. Before them, the server's very first request (Home) took "
        f"{s(result['server_first'][0])} to its heading and {s(result['server_first'][1])} to complete: it imports "
        "the libraries every page shares, torch among them, once per server.",
        "",
        "| page | first load: heading | first load: complete | heading (median) | complete (median) | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["pages"].values():
        first_heading, first_complete = r["first"]
        lines.append(
            f"| {r['title']} | {s(first_heading)} | {s(first_complete)} | {s(r['heading'])} | {s(r['complete'])} "
            f"| heading ≤ {TARGET_S:g} s |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else DEFAULT_DATASET)
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"error: no Chromium at {CHROMIUM} (Debian's chromium package)")
    if args.loads < 1:
        sys.exit("error: --loads must be at least 1")
    result = measure(args.data.resolve(), args.loads)
    command = "python -m bench.page_loads" + (f" --loads {args.loads}" if args.loads != 5 else "")
    write_section(args.out, "bench/page_loads.py", report(result, args.data, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
