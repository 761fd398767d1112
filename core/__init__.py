"""Lesion Lab core: data, models, training, evaluation and explanations for HAM10000.

This package never imports streamlit; the dashboard in ``pages/`` is a thin view over it.
"""

import os

# OpenMP's default has every torch thread spin at each parallel region's barrier until the others arrive. On cores
# shared with other work (a classroom's sessions, browsers, a training job) a descheduled partner keeps the spinner
# burning its whole time slice: one Diagnose prediction took 2.2 s of CPU and wall time instead of 0.1 s with two
# threads on this 2-core machine (docs/BENCHMARKS.md, "A classroom"). Waiting passively costs microseconds when idle.
# Read once, when torch first loads its OpenMP runtime, so it must be set before any ``import torch``; an explicit
# setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
