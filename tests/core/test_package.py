"""What importing ``core`` sets up for the process before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = (
    "import core, torch, os; torch.ones(8).sum(); "
    "print(os.environ.get('OMP_WAIT_POLICY'), torch.__config__.parallel_info().count('OpenMP'))"
)


@pytest.mark.integration
@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_waits_passively_unless_the_environment_says_otherwise(given, expected):
    # Busy-waiting OpenMP threads turned one Diagnose prediction on shared cores into 2 s of CPU (docs/BENCHMARKS.md,
    # "A classroom"): core must set the policy before torch reads it, and leave an explicit choice alone.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    policy, openmp = out.stdout.split()
    assert policy == expected
    assert int(openmp) >= 1  # the policy matters because torch runs on OpenMP here
