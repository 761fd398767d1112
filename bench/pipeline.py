"""The input pipeline, old against new, side by side in one run; writes its section of docs/BENCHMARKS.md.

    python -m bench.pipeline [--data ../shared/data/ham10000-200x150] [--quick]

CPU: augmented batches per second from today's PIL DataLoader (0 and 2 workers) and from the decoded-image
cache with batched kornia augmentation, for both recipes; then training images/s through the trainer users
run (``core.training.loop.train``, the reference preset on a subsample) with ``--input-pipeline jpeg`` and
``decoded``. GPU (only where CUDA is present): training images/s for MobileNetV2 at 150×200 and ResNet-18 at
224, and the wall time of the 14-epoch reference preset, with the device's name. Not a test: targets are
reported next to the measurements, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.benchmarks import machine
from bench.report import update_json, write_section
from core.data.augment import DeviceBatches, batch_transform
from core.data.dataset import LesionDataset, index_dataset
from core.data.decoded import open_decoded
from core.data.preprocessing import train_transform
from core.inference.features import FeatureBatches
from core.training.config import PRESETS, config_with
from core.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"
DEFAULT_OUT = ROOT / "docs" / "BENCHMARKS.md"
OWNER = "bench/pipeline.py"
PREP = PRESETS["reference"].preprocessing  # 150×200 input from the 200×150 images
BATCH = 32


def rate(batches, count: int) -> float:
    """Images per second over ``count`` batches after the first (which pays for starting workers)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for _, (images, _) in zip(range(count), it, strict=False):
        seen += len(images)
    return seen / (time.perf_counter() - start)


def bench_delivery(data: Path, cache_dir: Path, count: int) -> dict:
    frame = index_dataset(data).frame
    start = time.perf_counter()
    cache = open_decoded(frame["path"].tolist(), PREP, root=data, cache_dir=cache_dir)
    built = time.perf_counter() - start
    result = {
        "cache_build_s": built,
        "cache_images": len(frame),
        "cache_bytes": cache.images.nbytes,
        "batch": BATCH,
        "rows": [],
    }
    labels = torch.tensor(frame["label"].to_numpy())
    for augmentation in ("seed", "strong"):
        row = {"augmentation": augmentation}
        for workers in (0, 2):
            ds = LesionDataset.from_frame(frame, train_transform(PREP, augmentation), PREP, skip_damaged=True)
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=BATCH,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                collate_fn=ds.collate,
            )
            row[f"pil_{workers}_workers"] = rate(loader, count)
        rows = FeatureBatches(
            torch.from_numpy(cache.rows(frame["path"].tolist())),
            labels,
            BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        batches = DeviceBatches(cache, rows, batch_transform(PREP, augmentation, cache.size), torch.device("cpu"))
        row["decoded_batched"] = rate(batches, count)
        row["speedup"] = row["decoded_batched"] / max(row["pil_0_workers"], row["pil_2_workers"])
        print("delivery", row, flush=True)
        result["rows"].append(row)
    return result


def epoch_rates(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["images_per_s"] for e in events if e["event"] == "epoch"]


def bench_training(data: Path, cache_dir: Path, work: Path, images: int, repeats: int) -> dict:
    """CPU training images/s through core.training.loop.train, the reference preset on a stratified subsample;
    the two pipelines alternate so that a change in the machine's load reaches both."""
    found: dict[str, list[float]] = {"jpeg": [], "decoded": []}
    for i in range(repeats):
        for pipeline in found:
            cfg = config_with(
                "reference",
                data=str(data),
                out=str(work),
                name=f"{pipeline}-{i}",
                weights="none",
                epochs=1,
                max_images=images,
                input_pipeline=pipeline,
                decoded_dir=str(cache_dir),
                device="cpu",
            )
            found[pipeline] += epoch_rates(train(cfg))
            print("training", pipeline, found[pipeline][-1], flush=True)
    return {
        "images": images,
        "repeats": repeats,
        "jpeg": statistics.median(found["jpeg"]),
        "decoded": statistics.median(found["decoded"]),
    }


def bench_gpu(
    data: Path, cache_dir: Path, work: Path, epochs: int, batch: int, compile: bool, keep: Path | None
) -> dict:
    """Training images/s on CUDA (the best epoch after the first), new pipeline against the PIL DataLoader, and
    the wall time of the 14-epoch reference preset as users type it (ImageNet weights where they can be loaded).
    ``keep``: where to keep that reference run's folder (it is a real model, not only a timing)."""
    frame = index_dataset(data).frame
    start = time.perf_counter()
    open_decoded(frame["path"].tolist(), PREP, root=data, cache_dir=cache_dir)
    result = {
        "device": torch.cuda.get_device_name(0),
        "machine": machine(),
        "batch": batch,
        "epochs": epochs,
        "compile": compile,
        "cache_build_s": time.perf_counter() - start,
        "rows": [],
    }
    print("gpu decoded cache built in", result["cache_build_s"], flush=True)
    for label, overrides in (
        ("MobileNetV2, 150×200, full fine-tuning", {}),
        ("ResNet-18, 224×224, full fine-tuning", {"arch": "resnet18", "input_size": (224, 224)}),
        ("MobileNetV2, 150×200, PIL DataLoader (the old pipeline)", {"input_pipeline": "jpeg"}),
    ):
        cfg = config_with(
            "reference",
            data=str(data),
            out=str(work),
            name=label.split(",")[0] + str(len(result["rows"])),
            weights="none",
            epochs=epochs,
            batch_size=batch,
            decoded_dir=str(cache_dir),
            device="cuda",
            compile=compile,
            **overrides,
        )
        rates = epoch_rates(train(cfg))
        result["rows"].append({"model": label, "images_per_s": max(rates[1:] or rates), "epoch_rates": rates})
        print("gpu", result["rows"][-1], flush=True)
    out = keep.parent if keep else work
    command = [sys.executable, "-m", "core.cli.train", "--preset", "reference", "--data", str(data), "--device", "cuda"]
    command += ["--out", str(out), "--name", keep.name if keep else "reference", "--decoded-dir", str(cache_dir)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    result["reference_wall_s"] = time.perf_counter() - start
    run = out / (keep.name if keep else "reference")
    result["reference_images_per_s"] = statistics.median(epoch_rates(run))
    result["reference_weights"] = json.loads((run / "config.json").read_text())["weights"]
    print("gpu reference preset", result["reference_wall_s"], flush=True)
    return result


def write_report(results: dict, path: Path, command: str) -> None:
    d, t = results["delivery"], results["training"]
    lines = [
        "## Input pipeline: PIL DataLoader against the decoded-image cache with batched augmentation",
        "",
        f"Measured {results['date']} with `{command}` on {results['machine']}."
        + (f" Machine load: {results['note']}." if results.get("note") else ""),
        "",
        f"The cache of {d['cache_images']:,} images at 200×150 takes {d['cache_bytes'] / 2**30:.2f} GiB and was "
        f"built in {d['cache_build_s']:.1f} s (once per dataset and source size). Augmented batches of {d['batch']} "
        "at 150×200 per second, on the CPU (target: the cache at least 10× the PIL DataLoader):",
        "",
        "| recipe | PIL DataLoader, 0 workers | PIL DataLoader, 2 workers | cache + batched kornia | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['augmentation']} | {r['pil_0_workers']:.0f} images/s | {r['pil_2_workers']:.0f} images/s | "
            f"{r['decoded_batched']:.0f} images/s | {r['speedup']:.1f}× |"
        )
    lines += [
        "",
        f"CPU training through `core.training.loop.train` (reference preset, MobileNetV2 full fine-tuning at 150×200, "
        f"batch 32, random weights; {t['images']} images, one epoch, median of {t['repeats']}; target: the new "
        "pipeline at least as fast):",
        "",
        "| input pipeline | training images/s |",
        "| --- | --- |",
        f"| jpeg (PIL, as before) | {t['jpeg']:.1f} |",
        f"| decoded (cache + batched augmentation) | {t['decoded']:.1f} |",
        "",
    ]
    write_section(path, OWNER, lines)


def write_gpu_report(g: dict, path: Path, command: str) -> None:
    rows = g["rows"]
    lines = [
        "## Training on a GPU: the decoded-image cache with augmentation on the device",
        "",
        f"Measured {g['date']} with `{command}` on {g['device']} ({g['machine']}). Batch {g['batch']}, "
        f"torch.compile {'on' if g['compile'] else 'off'}, bf16 autocast, channels-last, random weights; "
        f"images/s of the training steps, the best of epochs 2–{g['epochs']}. Targets: MobileNetV2 ≥ 8,000 images/s, "
        "ResNet-18 ≥ 6,000, the 14-epoch reference preset ≤ 45 s wall.",
        "",
        "| model | training images/s |",
        "| --- | --- |",
        *(f"| {r['model']} | {r['images_per_s']:,.0f} |" for r in rows),
        "",
        f"The reference preset as users type it (`lesionlab train --preset reference --device cuda`: batch 32, "
        f"{g['reference_weights']} weights, 14 epochs, validation every epoch, then the temperature and the test "
        f"evaluation) took **{g['reference_wall_s']:.0f} s** wall from process start to exit, at a median "
        f"{g['reference_images_per_s']:,.0f} training images/s. The decoded-image cache was already there (building "
        f"it for the 10,015 images took {g['cache_build_s']:.1f} s in the same run).",
    ]
    write_section(path, OWNER + " --gpu-only", lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="few batches, a small training subsample, no repeats")
    p.add_argument("--note", default="", help="a word on the machine's load, written beside the figures")
    p.add_argument("--gpu-batch", type=int, default=256, help="training batch size on the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the GPU runs")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU section (the CPU figures stay as they are)")
    p.add_argument("--keep-reference", type=Path, help="keep the GPU reference preset's run folder here")
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, work = Path(tmp) / "decoded", Path(tmp) / "runs"
        if not args.gpu_only:
            results = {"date": date, "machine": machine(), "note": args.note}
            results["delivery"] = bench_delivery(args.data, cache_dir, 10 if args.quick else 60)
            results["training"] = bench_training(
                args.data, cache_dir, work, 320 if args.quick else 2000, 1 if args.quick else 3
            )
            command = "python -m bench.pipeline" + (" --quick" if args.quick else "")
            write_report(results, args.out, command)
            update_json(args.out.with_suffix(".json"), {"pipeline": results})
        if torch.cuda.is_available():
            gpu = {"date": date} | bench_gpu(
                args.data, cache_dir, work, 3, args.gpu_batch, args.compile, args.keep_reference
            )
            write_gpu_report(gpu, args.out, "python -m bench.pipeline --gpu-only" + " --compile" * args.compile)
            update_json(args.out.with_suffix(".json"), {"pipeline_gpu": gpu})
        elif args.gpu_only:
            sys.exit("error: --gpu-only, but no CUDA device is present")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
