"""Speed benchmarks on the real HAM10000 images; writes its section of docs/BENCHMARKS.md (and .json).

    python -m bench.benchmarks [--data ../shared/data/ham10000-200x150] [--quick]

Numbers are medians of repeated runs. Variants that change process-wide state
(the allocator setting) run in fresh subprocesses. Not a test: targets are
reported next to the measurements, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.report import update_json, write_section
from core.common.procs import stat_fields
from core.common.runs import RunLog
from core.common.runtime import torch_threads, tune_allocator
from core.data.dataset import LesionDataset, index_dataset
from core.data.preprocessing import Preprocessing, train_transform
from core.data.splits import split_by_lesion
from core.inference.features import FeatureBatches, compute_features
from core.inference.opening import open_predictor
from core.models.architectures import build_model
from core.models.checkpoints import atomic_save, checkpoint_dict
from core.training.config import PRESETS
from core.training.imbalance import oversample
from core.training.loop import make_optimizer, make_scheduler, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"
DEFAULT_OUT = ROOT / "docs" / "BENCHMARKS.md"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (VmRSS, which /proc gives in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status (the benchmarks read memory on Linux)")


def cpu_seconds(pid: int) -> float:
    """The user + system CPU time process ``pid`` has spent (Linux /proc)."""
    fields = stat_fields(pid)
    if fields is None:
        raise RuntimeError(f"no /proc/{pid}/stat (the benchmarks read CPU time on Linux)")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"Python {platform.python_version()}; {platform.platform()}"
    )


# ---------------------------------------------------------------------------
# Children: each runs in a fresh process so allocator settings do not leak between variants.


def child_extract(data: Path, arch: str, size: int, n: int, tuned: bool, channels_last: bool) -> dict:
    if tuned:
        tune_allocator()
    paths = index_dataset(data).frame["path"].tolist()[:n]
    model = build_model(arch, "none", "head")
    prep = Preprocessing(input_size=(size, size))
    compute_features(model.backbone, paths[:64], prep, device=torch.device("cpu"), channels_last=channels_last)
    times = timed(
        lambda: compute_features(
            model.backbone, paths, prep, device=torch.device("cpu"), batch_size=64, channels_last=channels_last
        ),
        3,
    )
    return {"images_per_s": n / statistics.median(times)}


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.benchmarks", "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Benchmarks


def bench_index(data: Path, repeats: int) -> dict:
    index_dataset(data)  # warm the page cache: we measure our code, not the disk
    times = timed(lambda: index_dataset(data), repeats)
    return {"median_s": statistics.median(times), "images": len(index_dataset(data).frame)}


def bench_epochs(data: Path, steps: int, repeats: int) -> dict:
    """Seed pipeline (frozen ResNet-18 + MLP head, oversampled training split, batch 16).

    Uncached: the backbone runs on augmented images every step; we time ``steps`` steps and
    scale to the epoch's step count. Cached: a full epoch of the head on cached features the way the
    trainer runs it (its batches, its epoch function, one thread).
    """
    tune_allocator()
    frame = index_dataset(data).frame
    frame = frame.assign(split=split_by_lesion(frame).to_numpy())
    train_rows = oversample(frame[frame["split"] == "train"])
    epoch_steps = len(train_rows) // 16
    cfg = PRESETS["seed"]
    prep = cfg.preprocessing
    model = build_model("resnet18", "none", "head", "mlp").to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, epoch_steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    ds = LesionDataset.from_frame(train_rows, train_transform(prep, "seed"), prep)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)

    def uncached_steps() -> None:
        model.train()
        model.backbone.eval()
        for i, (x, y) in enumerate(loader):
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i + 1 == steps:
                break

    per_step = statistics.median(timed(uncached_steps, repeats)) / steps

    features = torch.randn(len(train_rows), 512)  # the head's cost does not depend on the values
    labels = torch.tensor(train_rows["label"].to_numpy())
    batches = FeatureBatches(
        features, labels, 16, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True
    )
    head_opt = make_optimizer(cfg, model.head)
    head_sched = make_scheduler(cfg, head_opt, len(batches))
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1):
        log = RunLog(Path(tmp))
        cached = statistics.median(
            timed(
                lambda: train_one_epoch(
                    model.head,
                    batches,
                    loss_fn,
                    head_opt,
                    head_sched,
                    torch.device("cpu"),
                    epoch=1,
                    cfg=cfg,
                    log=log,
                    should_stop=lambda: False,
                ),
                repeats,
            )
        )
    return {
        "train_images": len(train_rows),
        "epoch_steps": epoch_steps,
        "uncached_epoch_s": per_step * epoch_steps,
        "uncached_measured_steps": steps,
        "cached_epoch_s": cached,
        "speedup": per_step * epoch_steps / cached,
    }


def bench_predict(data: Path, repeats: int) -> dict:

    tune_allocator()
    image = index_dataset(data).frame["path"].iloc[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r18.pt"
        model = build_model("resnet18", "none", "head", "mlp")
        atomic_save(checkpoint_dict(model, Preprocessing(input_size=(224, 224)), head="mlp"), ckpt)
        predictor = open_predictor(ckpt)
        for _ in range(3):
            predictor.explain(predictor.predict(image))
        predict = timed(lambda: predictor.predict(image), repeats)
        both = timed(lambda: predictor.explain(predictor.predict(image)), repeats)
    return {"predict_ms": 1000 * statistics.median(predict), "predict_gradcam_ms": 1000 * statistics.median(both)}


def write_report(results: dict, path: Path, command: str) -> None:
    r = results
    ext = r["extraction"]
    ep = r["epochs"]
    lines = [
        "## Components",
        "",
        f"Measured {r['date']} with `{command}` on: {r['machine']}.",
        "All numbers are medians of repeated runs on the real HAM10000 images (200×150 JPEG). Model weights are",
        "random (`weights none`): ImageNet files cannot be downloaded here, and speed does not depend on the values.",
        "",
        "| what | measured | target |",
        "| --- | --- | --- |",
        f"| index all {r['index']['images']} images (metadata + folder walk, no decoding) | "
        f"{r['index']['median_s'] * 1000:.0f} ms | < 1 s |",
        f"| seed head-only epoch, uncached ({ep['train_images']} oversampled images, {ep['epoch_steps']} steps of 16;"
        f" {ep['uncached_measured_steps']} steps timed, scaled to the epoch) | {ep['uncached_epoch_s']:.0f} s | |",
        f"| seed head-only epoch, cached features (full epoch, as the trainer runs it) | {ep['cached_epoch_s']:.2f} s"
        " | |",
        f"| cached vs uncached epoch | {ep['speedup']:.0f}× faster | ≥ 100× |",
    ]
    for row in ext:
        lines.append(
            f"| feature extraction, {row['arch']} at {row['size']}, batch 64, allocator "
            f"{'tuned' if row['tuned'] else 'default'}, {'channels_last' if row['channels_last'] else 'NCHW'}"
            f" | {row['images_per_s']:.0f} images/s | "
            f"{'≥ 70 images/s' if row['arch'] == 'mobilenet_v2' and row['tuned'] else ''} |"
        )
    lines += [
        f"| single-image prediction, resnet18 at 224 (decode + preprocess + forward) | "
        f"{r['predict']['predict_ms']:.0f} ms | |",
        f"| prediction + Grad-CAM, resnet18 at 224 | {r['predict']['predict_gradcam_ms']:.0f} ms | ≤ 150 ms |",
        "",
        "Allocator: `core.common.runtime.tune_allocator()` raises glibc's mmap and trim thresholds (via `mallopt`) so",
        "that large activation buffers stay in the heap between batches instead of being unmapped and page-faulted",
        "back in on every forward pass. The trainer, feature extraction and the predictor call it.",
    ]
    write_section(path, "bench/benchmarks.py", lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="fewer repeats (for trying the script)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arch, size, n, tuned, cl = args.child
        print(json.dumps(child_extract(args.data, arch, int(size), int(n), tuned == "1", cl == "1")))
        return
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    results = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    results["index"] = bench_index(args.data, 3 if args.quick else 9)
    print("index", results["index"], flush=True)
    n = 192 if args.quick else 512
    results["extraction"] = []
    for arch, tuned, cl in [
        ("mobilenet_v2", 0, 0),
        ("mobilenet_v2", 0, 1),
        ("mobilenet_v2", 1, 0),
        ("mobilenet_v2", 1, 1),
        ("resnet18", 1, 1),
    ]:
        row = run_child(arch, "224", str(n), str(tuned), str(cl))
        results["extraction"].append(
            {"arch": arch, "size": 224, "tuned": bool(tuned), "channels_last": bool(cl), **row}
        )
        print("extract", results["extraction"][-1], flush=True)
    results["epochs"] = bench_epochs(args.data, steps=20 if args.quick else 40, repeats=3 if args.quick else 3)
    print("epochs", results["epochs"], flush=True)
    results["predict"] = bench_predict(args.data, 10 if args.quick else 30)
    print("predict", results["predict"], flush=True)
    command = "python -m bench.benchmarks" + (" --quick" if args.quick else "")
    write_report(results, args.out, command)
    update_json(args.out.with_suffix(".json"), results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
