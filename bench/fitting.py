"""The upload-fitting rule, chosen on the validation split: each rule of ``core.data.images.FIT_RULES`` under the shifts
that change an image's shape (a square crop of the field, a 90° rotation), with the robustness report's metrics.

    python -m bench.fitting                                        # full dataset, checkpoints/reference.pt, val
    python -m bench.fitting --data sample_data/ham10000-sample --bootstrap 100   # a quick proof

The 2× and ½ scale shifts keep the 4:3 field, which every rule fits with the same single factor and no crop or
pad, so they cannot tell the rules apart (``tests/core/evaluation/test_robustness.py`` checks it); the robustness report
measures them under the predictor's rule. Writes its section of docs/BENCHMARKS.md and its key of docs/BENCHMARKS.json,
which the model card reads.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_DATA, machine
from bench.report import update_json, write_section
from core.data.images import FIT_RULE, FIT_RULES
from core.evaluation.robustness import CLEAN, evaluate_shifts, terminal_progress
from core.inference.forward import tta_description
from core.inference.predictor import USE_TTA_BY_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


OWNER = "fitting"
SHAPE_SHIFTS = ("square_crop", "rotate_90")
RULES = {
    "crop": "one factor to cover 200×150, centre crop",
    "pad": "one factor to fit inside 200×150, reflect-pad",
    "scale": "one factor bringing the shorter side to 150, then centre crop / reflect-pad",
}


def measure(args: argparse.Namespace) -> dict:
    results = {}
    for rule in FIT_RULES:
        print(f"fitting rule {rule}", file=sys.stderr)
        report = evaluate_shifts(
            args.checkpoint,
            args.data,
            split="val",
            shifts=SHAPE_SHIFTS,
            fit_rule=rule,
            bootstrap=args.bootstrap,
            max_images=args.max_images,
            tta=args.tta,
            progress=terminal_progress(rule),
        )
        results[rule] = {
            c["name"]: {k: c[k] for k in ("balanced_accuracy", "mel_auc", "ece", "drop") if k in c}
            for c in report["conditions"]
        }
        n_images, seconds = report["n_images"], report["seconds"]
        print(f"  {n_images} images × {len(report['conditions'])} conditions in {seconds:.0f} s", file=sys.stderr)
    mean = {
        rule: sum(r[s]["balanced_accuracy"] for s in SHAPE_SHIFTS) / len(SHAPE_SHIFTS) for rule, r in results.items()
    }
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "checkpoint": str(args.checkpoint.resolve().relative_to(ROOT)),
        "data": Path(args.data).name,
        "split": "val",
        "n_images": n_images,
        "sampled_from": report["sampled_from"],
        "bootstrap": args.bootstrap,
        "tta_views": tta_description(args.tta),
        "rules": results,
        "best": max(mean, key=mean.get),
    }


def _ci(drop: dict) -> str:
    return f"{drop['value']:+.3f} ({drop['ci'][0]:+.3f} to {drop['ci'][1]:+.3f})" if drop["ci"] else ""


def table(r: dict) -> list[str]:
    """The comparison as Markdown lines (also the model card's)."""
    lines = [
        "| rule | " + " | ".join(f"{s}: bal. acc. | drop (95% CI) | mel AUC" for s in SHAPE_SHIFTS) + " |",
        "| --- |" + " --- | --- | --- |" * len(SHAPE_SHIFTS),
    ]
    for rule, conditions in r["rules"].items():
        cells = []
        for s in SHAPE_SHIFTS:
            c = conditions[s]
            cells += [f"{c['balanced_accuracy']:.3f}", _ci(c["drop"]["balanced_accuracy"]), f"{c['mel_auc']:.3f}"]
        name = f"**{rule}** (the predictor's)" if rule == FIT_RULE else rule
        lines.append(f"| {name}: {RULES[rule]} | " + " | ".join(cells) + " |")
    clean = next(iter(r["rules"].values()))[CLEAN]
    lines += [
        "",
        f"Clean validation images (every rule alike, they are 200×150 already): balanced accuracy "
        f"{clean['balanced_accuracy']:.3f}, melanoma AUC {clean['mel_auc']:.3f}. Best mean balanced accuracy over "
        f"the two shifts: `{r['best']}`.",
    ]
    return lines


def shown_images(r: dict) -> str:
    sample = f" (a random sample of the {r['sampled_from']})" if r.get("sampled_from") else ""
    return f"{r['n_images']}{sample} {r['split']} images"


def section(r: dict, command: str) -> list[str]:
    return [
        "## Upload-fitting rule (bench/fitting.py)",
        "",
        f"`{command}` — {r['when']}, {r['machine']}. {r['checkpoint']} on {shown_images(r)} of {r['data']}, "
        f"{r['bootstrap']} paired bootstrap resamples, TTA: {r.get('tta_views', 'none')}.",
        "",
        *table(r),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "reference.pt")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-images", type=int, help="a random sample (seed 0) of this many validation images")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=USE_TTA_BY_DEFAULT,
        help="average the flips, as the predictor does by default",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    command = ("python -m bench.fitting " + " ".join(sys.argv[1:])).strip()
    results = measure(args)
    lines = section(results, command)
    write_section(args.out, OWNER, lines)
    update_json(args.out.with_suffix(".json"), {OWNER: results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
