"""Where a training step's time goes on a GPU: the model step alone (per-tensor and fused AdamW), the batched
kornia augmentation alone, the decoded-cache delivery, and the loop the trainer runs, at batch 32 (the reference
preset's) and 256, on synthetic pixels (no dataset needed), then a torch.profiler table of 25 steps at batch 32.

    python -m bench.gpu_step            # CUDA only; prints its figures and the profile

The trainer's step is :func:`core.training.loop.train_one_epoch`; this script times its parts one at a time, which
the trainer cannot, to tell which part to speed up. Not a test: nothing is asserted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from core.data.augment import DeviceBatches, batch_transform
from core.data.decoded import DecodedImages
from core.inference.features import FeatureBatches
from core.models.architectures import build_model
from core.training.config import PRESETS

PREP = PRESETS["reference"].preprocessing
IMAGES = 4096


def model_and_optimizer(device: torch.device, fused: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model("mobilenet_v2", "none", "full", "linear").to(device).to(memory_format=torch.channels_last)
    return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def ms_per_call(fn: Callable[[], object], n: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu_step.py needs a CUDA device")
    device = torch.device("cuda")
    pixels = np.random.default_rng(0).integers(0, 255, (IMAGES, *PREP.input_size, 3), dtype=np.uint8)
    cache = DecodedImages(Path("."), [str(i) for i in range(IMAGES)], pixels, [])
    print(torch.cuda.get_device_name(0), torch.__version__)
    for batch in (32, 256):
        x = torch.randn(batch, 3, *PREP.input_size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (batch,), device=device)
        for fused in (False, True):
            model, optimizer = model_and_optimizer(device, fused)
            ms = ms_per_call(partial(step, model, optimizer, x, y))
            print(f"batch {batch}: model step alone, {'fused' if fused else 'per-tensor'} AdamW: {ms:.1f} ms")
        for augmentation in ("strong", "wide"):
            transform = batch_transform(PREP, augmentation, cache.size).to(device)
            u8 = torch.randint(0, 255, (batch, 3, *PREP.input_size), dtype=torch.uint8, device=device)
            print(f"batch {batch}: {augmentation} augmentation alone: {ms_per_call(partial(transform, u8)):.1f} ms")
        rows = FeatureBatches(torch.arange(IMAGES), torch.randint(0, 7, (IMAGES,)), batch, shuffle=True)
        batches = DeviceBatches(cache, rows, batch_transform(PREP, "strong", cache.size), device)
        start = time.perf_counter()
        for _ in batches:
            pass
        torch.cuda.synchronize()
        rate = IMAGES / (time.perf_counter() - start)
        print(f"batch {batch}: decoded cache + strong augmentation delivered: {rate:,.0f} images/s")
        start = time.perf_counter()
        for inputs, targets in batches:
            step(model, optimizer, inputs, targets)
        torch.cuda.synchronize()
        rate = IMAGES / (time.perf_counter() - start)
        print(f"batch {batch}: delivery and step, one after the other: {rate:,.0f} images/s")
    model, optimizer = model_and_optimizer(device, False)
    rows = FeatureBatches(torch.arange(32 * 25), torch.randint(0, 7, (32 * 25,)), 32, shuffle=True)
    batches = DeviceBatches(cache, rows, batch_transform(PREP, "strong", cache.size), device)
    for inputs, targets in batches:
        step(model, optimizer, inputs, targets)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for inputs, targets in batches:
            step(model, optimizer, inputs, targets)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
