"""Process-level settings that decide CPU throughput: device choice, threads and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator() -> bool:
    """Stop glibc from handing large activation buffers back to the kernel after every batch.

    By default each tensor over the mmap threshold is mmap'd and munmap'd, so every
    forward pass page-faults its activations in again: on 2 cores about half the
    CPU time went to the kernel. Keeping freed memory in the heap removes that
    (measured in bench/benchmarks.py). Returns whether the setting took effect.
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):  # musl has no mallopt
        return False
    one_gib = 1 << 30
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, one_gib)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * one_gib))
    return _tuned


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the process's setting.

    For the head on cached features: its operations take microseconds, less than waking a second
    thread costs, and on shared cores every one of them waits for a thread that is not scheduled
    (a cached head-only epoch took 49 s with 2 threads against 4 s with 1 on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_problem(name: str) -> str | None:
    """Why ``name`` ("auto", "cpu", "cuda:1", …) is not a device to run on here, in a sentence; None when it is."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return f"there is no CUDA device {name!r} on this computer; use cpu"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "there is no Apple MPS device on this computer; use cpu"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"{name!r} is not a device Lesion Lab runs on; use auto, cpu, cuda, cuda:N or mps"
    return None


@cache
def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot compile for ``device`` here (on the CPU, inductor needs a working C++
    compiler), or None. A tiny function is compiled and run, so that a run asked to compile can say so before
    it starts rather than fail with a long traceback in its first step."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    return None


def gpu_count() -> int:
    """The CUDA GPUs this process sees: a run can train on several at once (torchrun)."""
    return torch.cuda.device_count()


def default_workers(device: torch.device) -> int:
    """Image-decoding workers: none on a small CPU box (they would steal the model's cores)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, max(1, cores - 2))
    return 0 if cores <= 4 else min(4, cores // 4)
