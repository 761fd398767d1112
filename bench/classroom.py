"""A classroom on one server: N students at once, each diagnosing an upload and answering a Quiz question.

    python -m bench.classroom [--students 1 10 30] [--data FOLDER] [--browsers own lowest] [--repeat 3]

Starts ``streamlit run streamlit_app.py`` on loopback (``--data``, default the bundled sample; the shipped
reference model) and, after one warm-up visit (the instructor's: the model and the case index load once per
server), lets N headless Chromium sessions (Playwright, /usr/bin/chromium, one browser, a context per student)
start together. Each opens Diagnose, uploads a different image of the dataset and waits for the answer's
heading (or, for an image the unfamiliar-image check flags, the warning that it was not assessed), then opens
Quiz, starts the 10-image quiz and answers its first question. Each room runs with the students' browsers at
the priorities Chromium sets itself and at the lowest (``--browsers``). Each room runs ``--repeat`` times: one
room of 30 moves its p95 by several seconds from one run to the next. Reports per N the medians over the repeats
of the p50/p95 time from the upload to the answer and for the quiz question (with the p95's range), the errors
(a timeout or an exception on the page, summed), and the server's resident memory (peak, sampled every 0.2 s),
then writes its section of docs/BENCHMARKS.md. Bounded: at most 40 students, 300 s per student, 9 repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.benchmarks import DEFAULT_OUT, cpu_seconds, machine, rss_bytes
from bench.report import write_section
from core.common.settings import CHECKPOINTS_ENV, DATA_ENV, DEFAULT_DATASET, RUNS_ENV
from tests.app_support import CHROMIUM, CHROMIUM_ARGS, ROOT, clean_env, streamlit_server

MAX_STUDENTS = 40
MAX_REPEATS = 9
STUDENT_TIMEOUT_S = 300
TARGETS = {"errors": 0, "diagnose_p95_s": 15.0, "rss_gb": 3.0}
# How a room's uploads meet the server. Arriving: every student opens Diagnose and uploads as soon as the page is
# ready, so the uploads meet the other students' page loads (each about a second of Chromium's CPU on the same two
# cores). Together: every page open first, then all uploads at one moment, as when the instructor says "now": the
# most uploads the server holds at once, and the answers' times without the page loads in them.
MODES = {"arriving": "arriving together", "together": "pages open, uploading together"}
# The students' Chromium at the priorities it sets itself, or at the lowest: in a classroom each browser runs on the
# student's own device, and on this machine the nearest to that is a server that gets the cores first; the browsers
# still take what is left of the same two cores, so the answers still wait on them. Chromium run as root sets most
# of its threads to the server's niceness and some above it (-8).
PRIORITIES = {"own": "Chromium's own (some threads above the server's)", "lowest": "lowest (SCHED_IDLE)"}
IDLE = (
    "() => { const a = document.querySelector('[data-testid=stApp]');"
    " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }"
)


async def student(
    browser, url: str, image: Path, *, whole_page: bool = False, together: asyncio.Barrier | None = None
) -> dict:
    """One student's visit: Diagnose an upload, then one Quiz question. Seconds to each answer, or the error.
    ``together``: the room's students upload at the same moment, once every one has Diagnose open."""
    context = await browser.new_context(viewport={"width": 1400, "height": 950})
    page = await context.new_page()
    page.set_default_timeout(STUDENT_TIMEOUT_S * 1000)
    step = "opening Diagnose"
    try:
        await page.goto(f"{url}/diagnose", wait_until="commit")
        await page.get_by_role("heading", name="Diagnose", exact=True).first.wait_for()
        await page.wait_for_function(IDLE, polling=100)
        if together is not None:
            step = "waiting for the room to open Diagnose"
            await asyncio.wait_for(together.wait(), STUDENT_TIMEOUT_S)
        start, step = time.perf_counter(), "waiting for the Diagnose answer"
        await page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(image))
        # The answer: the class heading, or (an image the unfamiliar-image check flags) the word that it was not
        # assessed, which is the page's answer too.
        answered = page.locator("h3").filter(has_text=")").or_(page.get_by_text("did not assess this image"))
        await answered.first.wait_for()
        diagnose = time.perf_counter() - start
        if whole_page:  # the instructor's visit waits for the similar cases: the case index is built once
            await page.get_by_role("heading", name="Similar confirmed cases").wait_for()
        step = "opening Quiz"
        await page.goto(f"{url}/quiz", wait_until="commit")
        await page.get_by_role("button", name="Start the quiz").wait_for()
        slider = page.get_by_role("slider", name="Images")
        await slider.focus()
        await slider.press("Home")
        start, step = time.perf_counter(), "starting the quiz"
        await page.get_by_role("button", name="Start the quiz").click()
        await page.get_by_text("Image 1 of 10").wait_for()
        await page.wait_for_function(IDLE, polling=100)
        step = "answering the question"
        await page.get_by_test_id("stRadioGroup").get_by_text("nv · Melanocytic nevus", exact=True).click()
        await page.get_by_role("button", name="Reveal").click()
        await page.get_by_text("Confirmed by").wait_for()
        question = time.perf_counter() - start
        if await page.locator("[data-testid=stException]").count():
            return {"error": "an exception on the page"}
        return {"diagnose": diagnose, "quiz": question}
    except Exception as exc:  # noqa: BLE001 — a student's failure is a result to count, not the benchmark's end
        if together is not None and step == "opening Diagnose":
            await together.abort()  # the others must not wait for a student who never arrives
        return {"error": f"{type(exc).__name__} {step}: {str(exc).splitlines()[0][:120]}"}
    finally:
        await context.close()


def chromium_at_lowest_priority(folder: Path) -> Path:
    """An executable that starts /usr/bin/chromium in the SCHED_IDLE class, which every process and thread it
    starts inherits: they run only on what the server leaves of a core. Not ``nice 19``: Chromium sets its threads'
    niceness itself, and run as root it set most back to 0 and some to -8, above the server."""
    wrapper = folder / "chromium-idle"
    wrapper.write_text(f'#!/bin/sh\nexec chrt --idle 0 {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


async def room(
    url: str,
    pid: int,
    images: list[Path],
    n: int,
    *,
    whole_page: bool = False,
    together: bool = False,
    chromium: Path = CHROMIUM,
) -> dict:
    """N students at once (see :func:`student`); ``together``: their uploads at one moment, pages already open;
    ``chromium``: the browser's executable (see :func:`chromium_at_lowest_priority`)."""
    from playwright.async_api import async_playwright

    peak = [rss_bytes(pid)]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes(pid))
            await asyncio.sleep(0.2)

    # The browsers' own CPU time: Chromium and Playwright's driver are this process's children, counted once the
    # driver has exited (after the block), so the students' share of the two cores shows beside the server's.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            sampler = asyncio.create_task(sample())
            cpu, start = cpu_seconds(pid), time.perf_counter()
            barrier = asyncio.Barrier(n) if together else None
            results = await asyncio.gather(
                *(
                    student(browser, url, images[i % len(images)], whole_page=whole_page, together=barrier)
                    for i in range(n)
                )
            )
            wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
            sampler.cancel()
        finally:
            await browser.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    browsers = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return {
        "students": results,
        "wall": wall,
        "server_cpu": cpu,
        "browser_cpu": browsers,
        "peak_rss": peak[0],
        "rss_after": rss_bytes(pid),
    }


def measure(data: Path, counts: list[int], priorities: list[str], repeats: int) -> dict:
    from core.data.dataset import index_dataset

    frame = index_dataset(data).frame
    images = [Path(p) for p in frame.sort_values("image_id")["path"]]
    out: dict = {"rooms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**clean_env(), DATA_ENV: str(data), RUNS_ENV: str(Path(tmp) / "runs")}
        env[CHECKPOINTS_ENV] = str(ROOT / "checkpoints")
        with streamlit_server(env, Path(tmp) / "server.log") as server:
            out["rss_start"] = rss_bytes(server.pid)
            warm = asyncio.run(room(server.url, server.pid, images, 1, whole_page=True))
            out["warm"] = warm["students"][0]
            out["rss_warm"] = warm["rss_after"]
            print(f"warm-up (the first visit loads the model and the case index): {out['warm']}", flush=True)
            browsers = {"own": CHROMIUM, "lowest": chromium_at_lowest_priority(Path(tmp))}
            # Repeats outermost: a slow spell of the machine then touches every kind of room alike.
            for repeat in range(repeats):
                for n in counts:
                    for mode in MODES:
                        for priority in priorities:
                            together, chromium = mode == "together", browsers[priority]
                            result = asyncio.run(
                                room(server.url, server.pid, images[1:], n, together=together, chromium=chromium)
                            )
                            out["rooms"].setdefault((n, mode, priority), []).append(result)
                            print(
                                f"{n} students, {MODES[mode]}, browsers {priority}, run {repeat + 1}: "
                                f"{summary(result)}",
                                flush=True,
                            )
    out["load_after"] = os.getloadavg()[0]
    return out


def summary(result: dict) -> dict:
    done = [s for s in result["students"] if "error" not in s]

    def pct(key: str, q: float) -> float:
        return float(np.percentile([s[key] for s in done], q)) if done else float("nan")

    return {
        "n": len(result["students"]),
        "errors": [s["error"] for s in result["students"] if "error" in s],
        "diagnose_p50": pct("diagnose", 50),
        "diagnose_p95": pct("diagnose", 95),
        "quiz_p50": pct("quiz", 50),
        "quiz_p95": pct("quiz", 95),
        "peak_rss_gb": result["peak_rss"] / 2**30,
        "server_cpu_per_student": result["server_cpu"] / len(result["students"]),
        "browser_cpu_per_student": result["browser_cpu"] / len(result["students"]),
        "wall": result["wall"],
    }


def medians(results: list[dict]) -> dict:
    """The repeats of one room: each figure's median, the errors of all of them, the p95's range."""
    runs = [summary(r) for r in results]
    out = {k: float(np.median([s[k] for s in runs])) for k in runs[0] if k not in ("n", "errors")}
    out["errors"] = [e for s in runs for e in s["errors"]]
    out["n"], out["runs"] = runs[0]["n"], len(runs)
    out["diagnose_p95_range"] = (min(s["diagnose_p95"] for s in runs), max(s["diagnose_p95"] for s in runs))
    return out


def report(out: dict, data: Path, command: str) -> list[str]:
    lines = [
        "## A classroom: N students at once on one server",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M UTC} with `{command}` on: {machine()}; load average (1 min) "
        f"{out['load_after']:.1f} at the end (the students' Chromium shares the two cores with the server). "
        f"`streamlit run` on loopback with the dataset `{data.name}` and the shipped reference model; every "
        "student a fresh browser session: Diagnose an upload (each a different image), then the 10-image Quiz's "
        "first question answered and revealed. Every figure is the median over the room's repeats "
        f"({len(next(iter(out['rooms'].values())))} runs each, taken in turns), the Diagnose p95's range beside it; "
        "errors are summed over the runs. Each room twice: *arriving together* (every student opens Diagnose "
        "at once and uploads when the page is ready, so uploads meet the other students' page loads) and *pages "
        "open, uploading together* (every page open first, then all uploads at one moment). Each with the students' "
        "Chromium at the priorities it sets itself (run as root, most threads at the server's, some above it) and, "
        "as the nearest this machine gets to their browsers running on their own devices, at the lowest "
        "(SCHED_IDLE: the server gets the cores first, the browsers what is left). "
        "Times from the upload (or the quiz's start) to the answer on screen. Before the rooms, one warm-up visit "
        f"(the instructor's) loaded what the server shares: server RSS {out['rss_start'] / 2**30:.2f} GB at start, "
        f"{out['rss_warm'] / 2**30:.2f} GB after it "
        f"(Diagnose answer in {out['warm'].get('diagnose', float('nan')):.1f} s).",
        "",
        "| students | how | browsers' priority | errors | Diagnose answer p50 | p95 (range) | Quiz question p50 | p95 "
        "| server peak RSS | CPU per student: server / browsers | wall | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (n, mode, priority), results in out["rooms"].items():
        s = medians(results)
        errors = str(len(s["errors"])) + (f" ({s['errors'][0]})" if s["errors"] else "")
        cpu = f"{s['server_cpu_per_student']:.2f} s / {s['browser_cpu_per_student']:.1f} s"
        low, high = s["diagnose_p95_range"]
        lines.append(
            f"| {n} | {MODES[mode]} | {PRIORITIES[priority]} | {errors} | {s['diagnose_p50']:.1f} s "
            f"| {s['diagnose_p95']:.1f} s ({low:.1f}–{high:.1f}) | {s['quiz_p50']:.1f} s | {s['quiz_p95']:.1f} s "
            f"| {s['peak_rss_gb']:.2f} GB | {cpu} | {s['wall']:.0f} s | 0 errors, Diagnose p95 "
            f"≤ {TARGETS['diagnose_p95_s']:g} s, RSS ≤ {TARGETS['rss_gb']:g} GB |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", type=int, nargs="+", default=[1, 10, 30])
    p.add_argument("--data", type=Path, default=DEFAULT_DATASET)
    p.add_argument(
        "--browsers", nargs="+", choices=list(PRIORITIES), default=list(PRIORITIES), help="the browsers' priorities"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each room (the report gives their medians)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"error: no Chromium at {CHROMIUM} (Debian's chromium package)")
    if min(args.students) < 1 or max(args.students) > MAX_STUDENTS:
        sys.exit(f"error: --students between 1 and {MAX_STUDENTS}")
    if not 1 <= args.repeat <= MAX_REPEATS:
        sys.exit(f"error: --repeat between 1 and {MAX_REPEATS}")
    out = measure(args.data.resolve(), args.students, args.browsers, args.repeat)
    command = "python -m bench.classroom" + (
        "" if args.students == [1, 10, 30] else " --students " + " ".join(map(str, args.students))
    )
    if args.browsers != list(PRIORITIES):
        command += " --browsers " + " ".join(args.browsers)
    if args.repeat != 3:
        command += f" --repeat {args.repeat}"
    if args.data.resolve() != DEFAULT_DATASET.resolve():
        command += f" --data {args.data}"
    write_section(args.out, "bench/classroom.py", report(out, args.data, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
