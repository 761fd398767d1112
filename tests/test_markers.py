"""The `integration` marker splits the suite as promised: `-m "not integration"` is the fast loop without the
full HAM10000, and tests/conftest.py marks every test that asks for it (the ham_root fixture)."""

from __future__ import annotations

import subprocess
import sys

from tests.app_support import ROOT

# One test per file that uses ham_root, none of them decorated by hand.
ON_THE_FULL_DATASET = {
    "tests/pages/test_app_core.py::test_dermoscopy_check_on_real_images",
    "tests/pages/test_browser_pages.py::test_sidebar_dataset_folder_on_the_full_dataset",
    "tests/core/data/test_dataset.py::test_real_ham10000_indexes_completely",
    "tests/core/training/test_training.py::test_pretrained_head_only_learns_real_lesions",
}


def collected(marker_expression: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker_expression],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_integration_marker_selects_the_tests_on_the_full_dataset(request):
    # `-m integration` selects them, in a real collection...
    assert ON_THE_FULL_DATASET <= collected("integration")
    # ...because every test of this run that asks for ham_root carries the marker, and no other does.
    for item in request.session.items:
        assert ("ham_root" in item.fixturenames) == (item.get_closest_marker("integration") is not None), item.nodeid
    assert request.node.get_closest_marker("integration") is None  # the fast loop keeps this test
