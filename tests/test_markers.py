"""The `integration` marker splits the suite as promised: `-m "not integration"` is the fast loop, in one
process and without the full HAM10000. tests/conftest.py marks the tests on the full dataset (the ham_root
fixture) and in a real browser, and fails any other test that starts a process without the marker."""

from __future__ import annotations

import pytest

from tests.app_support import ROOT

pytest_plugins = ["pytester"]

# One test per file that uses ham_root, none of them decorated by hand.
ON_THE_FULL_DATASET = {
    "tests/pages/test_app_core.py::test_dermoscopy_check_on_real_images",
    "tests/pages/test_browser_pages.py::test_sidebar_dataset_folder_on_the_full_dataset",
    "tests/core/data/test_dataset.py::test_real_ham10000_indexes_completely",
    "tests/core/training/test_training.py::test_pretrained_head_only_learns_real_lesions",
}


@pytest.mark.integration  # importing the test modules starts libraries' probes (git, fc-list) where not done yet
def test_integration_marker_selects_the_tests_on_the_full_dataset_in_a_real_collection(pytester):
    # The project's own collection, as `pytest --collect-only -m integration` makes it, in this process (where the
    # modules are imported already), one session without the addopts' two test processes.
    done = pytester.runpytest_inprocess(
        *("--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts="),
        *("--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-m", "integration", str(ROOT / "tests")),
    )
    assert done.ret == 0, "\n".join(done.outlines[-30:])
    assert ON_THE_FULL_DATASET <= {line for line in done.outlines if "::" in line}


def test_tests_on_the_full_dataset_or_in_a_browser_are_marked(request):
    for item in request.session.items:
        expected = "ham_root" in item.fixturenames or item.get_closest_marker("browser") is not None
        if expected:
            assert item.get_closest_marker("integration") is not None, item.nodeid
    assert request.node.get_closest_marker("integration") is None  # the fast loop keeps this test


def test_an_unmarked_test_that_starts_a_process_fails(pytester):
    # Python's audit event is what subprocess.Popen raises: the same signal, without a process to start.
    pytester.makepyfile(
        """
        import sys
        import pytest

        def start():
            sys.audit("subprocess.Popen", "/bin/true", ["/bin/true"], None, None)

        def test_a_starts_unmarked():
            start()

        @pytest.mark.integration
        def test_b_starts_marked():
            start()

        def test_c_starts_nothing():  # last, so that this outer test's own record ends empty
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_a_starts_unmarked started a process (/bin/true)*mark it @pytest.mark.integration*"]
    )
