"""The model picker of Diagnose, Batch, Quiz and Evaluate's external test set: each model with its measured test
balanced accuracy or "not evaluated", the bundled reference model first, experimental runs only behind "Show
experimental models" (AppTest, real runs from tests.app_support.picker_env). Quiz and Evaluate listed bare file names,
every run alike, before they shared it."""

from __future__ import annotations

import pytest

from core.common.runs import read_evaluation, read_run
from tests.app_support import *  # noqa: F403
from tests.app_support import app_test, no_exceptions, pick_model, texts

PAGES = {"diagnose": "diag", "batch": "batch", "quiz": "quiz", "evaluate": "ext"}


@pytest.fixture
def page(picker_env, monkeypatch, request):
    picker_env.apply(monkeypatch)
    at = app_test(request.param)
    if request.param == "evaluate":
        at.session_state["eval_section"] = "External test set"  # what a click on its tab does
        at.run()
    no_exceptions(at)
    return at, PAGES[request.param]


def options(at, prefix: str) -> list[str]:
    return list(at.selectbox(key=f"{prefix}_model").options)


@pytest.mark.parametrize("page", list(PAGES), indirect=True)
def test_experimental_runs_are_listed_only_with_the_switch_on(page, picker_env):
    at, prefix = page
    clinical = read_evaluation(picker_env.runs / "clinical")["test"]["balanced_accuracy"]
    # The reference model first, saying that nothing measured it; the finished run on enough images with its figure.
    assert options(at, prefix) == [
        "checkpoint: reference — not evaluated",
        "checkpoint: copied — not evaluated",
        f"run: clinical — test balanced accuracy {clinical:.1%}",
    ]
    assert at.toggle(key=f"{prefix}_experimental").value is False
    assert "3 experimental models not listed" in texts(at)

    at.toggle(key=f"{prefix}_experimental").set_value(True).run()
    no_exceptions(at)
    listed = options(at, prefix)
    assert listed[0] == "checkpoint: reference — not evaluated" and len(listed) == 6
    train = read_run(picker_env.runs / "small").start["split_sizes"]["train"]
    weak = read_evaluation(picker_env.runs / "weak")["test"]["balanced_accuracy"]
    assert any(o.startswith("run: small — ") and f"experimental: trained on {train:,} images" in o for o in listed)
    assert f"run: weak — test balanced accuracy {weak:.1%} — experimental: test balanced accuracy below 50%" in listed
    assert any(o.startswith("run: stopped — ") and "stopped before its last epoch" in o for o in listed)
    assert "not listed" not in texts(at)


@pytest.mark.parametrize("page", list(PAGES), indirect=True)
def test_an_experimental_model_in_use_says_why(page):
    at, prefix = page
    pick_model(at, prefix, "run: stopped")
    no_exceptions(at)
    assert at.session_state[f"{prefix}_model"].parent.name == "stopped"
    assert any("Experimental model: stopped before its last epoch" in w.value for w in at.warning)
    # Hiding them again falls back to the reference model rather than keeping a hidden one in use.
    at.toggle(key=f"{prefix}_experimental").set_value(False).run()
    no_exceptions(at)
    assert at.session_state[f"{prefix}_model"].name == "reference.pt"
    assert not any("Experimental model" in w.value for w in at.warning)
