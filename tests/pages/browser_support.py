"""What the real-browser tests share: the app's data (the bundled sample, two finished runs, the shipped
reference model), one Streamlit server on loopback and one headless Chromium per test module, and the steps
they take on a page.

Screenshots go to a temporary folder; with ``LESIONLAB_UPDATE_SCREENSHOTS=1`` they also replace
``docs/screenshots/<page>.png`` (the README shows those).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.app_support import (
    ROOT,
)

SAMPLE = ROOT / "sample_data" / "ham10000-sample"


REFERENCE = ROOT / "checkpoints" / "reference.pt"


SHOTS = ROOT / "docs" / "screenshots"


def new_page(browser, width: int = 1400, **options):
    """A fresh browser session (its own Streamlit session state), ``width`` pixels wide."""
    context = browser.new_context(viewport={"width": width, "height": 950}, device_scale_factor=1, **options)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    return pg


def idle(pg) -> None:
    """Wait until the script (or fragment) has finished its run."""
    pg.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') !== 'running'; }"
    )


def settle(pg, title: str) -> None:
    """Wait until the page's title is shown and the script has finished its run."""
    pg.get_by_role("heading", name=title, exact=True).first.wait_for()
    idle(pg)
    pg.wait_for_timeout(800)  # plotly draws asynchronously
    errors = pg.locator("[data-testid=stException]")
    assert errors.count() == 0, errors.first.inner_text()


def shot(pg, name: str, tmp_path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main section, so grow the viewport to fit it first."""
    path = tmp_path / f"{name}.png"
    size = pg.viewport_size
    height = pg.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    pg.set_viewport_size({"width": size["width"], "height": min(max(size["height"], height + 40), 4000)})
    pg.wait_for_timeout(1200)
    pg.screenshot(path=str(path))
    pg.set_viewport_size(size)
    keep(path)


def keep(path: Path) -> None:
    """Copy a screenshot into the README's folder when asked to (``LESIONLAB_UPDATE_SCREENSHOTS=1``)."""
    assert path.stat().st_size > 10_000, f"{path.name} looks blank"
    if os.environ.get("LESIONLAB_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)


def visit(pg, server, path: str, title: str) -> None:
    pg.goto(f"{server}/{path}")
    settle(pg, title)


# The tables on screen (a closed tab's or expander's are in the page, hidden).
TABLES = """() => [...document.querySelectorAll('[data-testid=stDataFrame]')]
  .filter(d => d.checkVisibility()).map(d => {
  const grid = d.querySelector('.dvn-scroller'), box = d.getBoundingClientRect();
  return {right: box.right, hidden: grid ? grid.scrollWidth - grid.clientWidth : 0};
})"""


def choose_run(pg, name: str) -> None:
    pg.locator("[data-testid=stSelectbox]").first.click()
    pg.get_by_role("option").filter(has_text=name).first.click()


def set_dataset_folder(pg, server, folder: Path) -> None:
    """Open the Dataset page and type ``folder`` into the sidebar's setting."""
    visit(pg, server, "dataset", "Dataset")
    box = pg.get_by_label("Dataset folder", exact=True)
    box.fill(str(folder))
    box.press("Enter")


def curve_points(pg) -> int:
    """Markers of the first curve (training loss) in the first chart on the page."""
    return pg.evaluate(
        "() => { const t = document.querySelector('.js-plotly-plot .scatterlayer .trace');"
        " return t ? t.querySelectorAll('.point').length : 0; }"
    )


def choose(pg, label: str, option: str) -> None:
    pg.get_by_label(label, exact=True).click()
    pg.get_by_role("option", name=option, exact=True).click()
