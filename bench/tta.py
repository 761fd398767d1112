"""Multi-view test-time augmentation (TTA) on a checkpoint: which views help; writes its own
section of docs/BENCHMARKS.md (and .json).

    python -m bench.tta [--data ../shared/data/ham10000-200x150] [--checkpoint checkpoints/reference.pt]

Accuracy: every image of the validation and test splits (lesion-grouped, the checkpoint's seed and fractions, as
``lesionlab evaluate`` recomputes them) goes through the model once under every candidate view — the four
flips at each zoom of ``CANDIDATE_SCALES`` (below 1 the uncovered border is black, as in training's zooms) — and
each configuration averages its views' calibrated probabilities. Configurations are chosen on validation; test is
reported beside it. The Δ column is the paired bootstrap interval of the balanced-accuracy gain over no TTA.

What the views cost per Diagnose answer is measured in one place, ``bench/diagnose_cost.py``, for every model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine
from bench.report import update_json, write_section
from core.common.labels import MELANOMA
from core.data.dataset import LesionDataset
from core.data.splits import resolve_split, select_split
from core.evaluation.evaluate import index_data
from core.inference.forward import TTA_SCALES, flip_views, tta_description, zoom
from core.inference.opening import open_predictor
from core.inference.predictor import Predictor
from core.metrics.classification import balanced_accuracy, compute_metrics

ROOT = Path(__file__).resolve().parents[1]


CHECKPOINT = ROOT / "checkpoints" / "reference.pt"
CACHE = ROOT / ".cache" / "tta"
CANDIDATE_SCALES = (1.0, 1.15)
# Each configuration: the zooms whose four flips it averages; "none" is the image alone.
CONFIGURATIONS = {"none": (), "flips": (1.0,), "flips × zoom 1.15": (1.15,), "flips × zoom 1, 1.15": (1.0, 1.15)}
BOOTSTRAP = 1000


def view_probabilities(predictor: Predictor, data: Path, split: str, max_images: int | None) -> tuple:
    """(probabilities of every candidate view: zooms × 4 flips × images × classes, labels) for one split. Kept in
    ``CACHE`` for the checkpoint file, split and views, so that a rerun (to time the cost again) skips this."""
    seed, fractions, _ = resolve_split(predictor.checkpoint)
    holdout = (predictor.checkpoint.get("config") or {}).get("holdout_source") or ""
    frame = select_split(index_data(data).frame, split, seed, fractions, holdout)
    frame = frame.sample(n=max_images, random_state=0) if max_images and max_images < len(frame) else frame
    stat = predictor.path.stat()
    key = f"{predictor.path.name}-{stat.st_size}-{stat.st_mtime_ns}-{split}-{len(frame)}-{CANDIDATE_SCALES}"
    cached = CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cached.is_file():
        saved = np.load(cached)
        if saved["image_ids"].tolist() == frame["image_id"].tolist():
            return saved["views"], saved["labels"]
    dataset = LesionDataset.from_frame(frame, predictor.transform, predictor.prep)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=0)
    # Black in the normalised space the views are made in: what training's rotations and zooms leave.
    black = [-m / s for m, s in zip(predictor.prep.mean, predictor.prep.std, strict=True)]
    out, labels, start = [], [], time.perf_counter()
    with torch.inference_mode():
        for inputs, targets in loader:
            views = torch.cat([flip_views(zoom(inputs, s, black)) for s in CANDIDATE_SCALES])
            probs = torch.softmax(predictor.model(views).float() / predictor.temperature, dim=1)
            out.append(probs.view(len(CANDIDATE_SCALES), 4, len(inputs), -1).numpy())
            labels.append(targets.numpy())
            done = sum(len(t) for t in labels)
            print(f"\r  {split}: {done}/{len(dataset)} images, {time.perf_counter() - start:.0f} s", end="", flush=True)
    print(flush=True)
    views, labels = np.concatenate(out, axis=2), np.concatenate(labels)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cached, views=views, labels=labels, image_ids=frame["image_id"].to_numpy(str))
    return views, labels


def configuration_probs(views: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
    if not scales:
        return views[CANDIDATE_SCALES.index(1.0), 0]
    return views[[CANDIDATE_SCALES.index(s) for s in scales]].mean(axis=(0, 1))


def gain_interval(labels: np.ndarray, probs: np.ndarray, baseline: np.ndarray) -> list[float]:
    """95 % paired percentile bootstrap interval of balanced accuracy(probs) − balanced accuracy(baseline)."""
    rng = np.random.default_rng(0)
    gains = [
        balanced_accuracy(labels[i], probs[i]) - balanced_accuracy(labels[i], baseline[i])
        for i in rng.integers(0, len(labels), size=(BOOTSTRAP, len(labels)))
    ]
    return [float(v) for v in np.percentile(gains, [2.5, 97.5])]


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def score(labels: np.ndarray, probs: np.ndarray, baseline: np.ndarray, threshold: float) -> dict:
    m = compute_metrics(labels, probs, mel_threshold=threshold)
    return {
        "balanced_accuracy": m["balanced_accuracy"],
        "accuracy": m["accuracy"],
        "mel_auc": m["roc_auc"]["per_class"][MELANOMA],
        "ece": m["ece"],
        "mel_sensitivity": m["melanoma"]["sensitivity"],
        "mel_specificity": m["melanoma"]["specificity"],
        "gain_interval": gain_interval(labels, probs, baseline),
    }


def accuracy(predictor: Predictor, data: Path, splits: list[str], max_images: int | None) -> dict:
    results = {}
    for split in splits:
        views, labels = view_probabilities(predictor, data, split, max_images)
        baseline = configuration_probs(views, ())
        results[split] = {
            "images": len(labels),
            **{
                name: score(labels, configuration_probs(views, scales), baseline, predictor.mel_threshold)
                for name, scales in CONFIGURATIONS.items()
            },
        }
        print(split, {name: round(r["balanced_accuracy"], 4) for name, r in results[split].items() if name != "images"})
    return results


def write_report(results: dict, path: Path, command: str) -> None:
    r = results
    lines = [
        "## Test-time augmentation: which views help",
        "",
        f"Measured {r['date']} with `{command}` on: {r['machine']}; load average (1 min) {r['load_before']:.1f} "
        f"before, {r['load_after']:.1f} after"
        + (
            " — above the core count: other work shared the CPU, so rerun idle before quoting the times."
            if max(r["load_before"], r["load_after"]) > (os.cpu_count() or 1)
            else "."
        ),
        f"`{r['checkpoint']}` ({r['arch']}, input {r['input_size'][0]}×{r['input_size'][1]}, temperature "
        f"{r['temperature']:.3f}); melanoma counted positive at P(mel) ≥ {r['mel_threshold']:g}. Zooms below 1 "
        "leave a black border, as training's zooms do. Δ: 95 % paired bootstrap interval of the balanced-accuracy "
        "gain over no TTA.",
        "",
    ]
    for split in r["accuracy"]:
        s = r["accuracy"][split]
        lines += [
            f"**{'Validation' if split == 'val' else 'Test'} split** ({s['images']} images"
            f"{', where the views are chosen' if split == 'val' else ', reported only'}):",
            "",
            "| views | balanced accuracy | Δ | accuracy | melanoma AUC | ECE | mel sensitivity / specificity |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in CONFIGURATIONS:
            c = s[name]
            low, high = c["gain_interval"]
            delta = "" if name == "none" else f"{low:+.3f} … {high:+.3f}"
            mel = [_num(c[k]) for k in ("mel_auc", "mel_sensitivity", "mel_specificity")]
            lines.append(
                f"| {name} | {c['balanced_accuracy']:.3f} | {delta} | {c['accuracy']:.3f} | {mel[0]} | "
                f"{c['ece']:.3f} | {mel[1]} / {mel[2]} |"
            )
        lines.append("")
    lines += [
        "What the views cost per Diagnose answer: the section *Diagnose: milliseconds per answer, by model* "
        "(`bench/diagnose_cost.py`).",
    ]
    lines += ["", f"Default TTA (`core.inference.forward.TTA_SCALES`): {r['default']}."]
    write_section(path, "bench/tta.py", lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.add_argument("--max-images", type=int, help="a random N images of each split (seed 0), for trying the script")
    args = p.parse_args()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    predictor = open_predictor(args.checkpoint)
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "checkpoint": os.path.relpath(args.checkpoint, ROOT),
        "arch": predictor.arch,
        "input_size": list(predictor.prep.input_size),
        "temperature": predictor.temperature,
        "mel_threshold": predictor.mel_threshold,
        "default": tta_description(True) + f" ({len(TTA_SCALES) * 4} views)",
    }
    results["load_before"] = os.getloadavg()[0]
    results["accuracy"] = accuracy(predictor, args.data, args.splits, args.max_images)
    results["load_after"] = os.getloadavg()[0]
    command = " ".join(sys.argv).replace(sys.argv[0], "python -m bench.tta", 1)
    write_report(results, args.out, command)
    update_json(args.out.with_suffix(".json"), {"tta": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
