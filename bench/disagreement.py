"""How often the "disagreement" flags Diagnose shows beside an answer mark a wrong answer, on the test split.

    python -m bench.disagreement                                  # the full dataset, checkpoints/reference.pt
    python -m bench.disagreement --max-per-split 60               # a quick proof on a few images

Two flags, as Diagnose raises them:

1. **The nearest confirmed cases disagree**: among the model's :data:`~core.inference.similar.NEIGHBOURS` nearest
   train/val images in its own features (the case index of ``core.inference.similar``, built or reused with progress),
   the most common diagnosis is another class than the model's answer (``neighbours_disagree``). The answer is the
   model's flip-averaged one, as Diagnose gives it: the run's saved ``lesionlab evaluate`` report when it matches the
   test images, else a flip-averaged pass here.
2. **The ensemble's models disagree**: not every member of a published ensemble (``docs/runs/ensemble-*``) has the
   ensemble's answer as its own, from the members' recorded one-view test predictions beside the ensemble's.

For each flag on the test split: how many answers it flags, its precision (the share of flagged answers that are
wrong) against the error rate of all answers, and its recall (the share of wrong answers it flags), with 95 % bootstrap
intervals over the test images. Writes its section of docs/BENCHMARKS.md and its key of docs/BENCHMARKS.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from bench.benchmarks import machine
from bench.report import update_json, write_section
from bench.similar import PROOF_NOTE, case_arguments, model_cases
from core.common.labels import CLASSES
from core.common.runs import read_evaluate_report, read_evaluation, read_predictions
from core.inference.predictor import frame_batches
from core.inference.similar import NEIGHBOURS, REFERENCE_SPLITS, knn_vote, neighbours_disagree

ROOT = Path(__file__).resolve().parents[1]
OWNER = "disagreement"
RUNS = ROOT / "docs" / "runs"
RESAMPLES = 2000


def flag_quality(flagged: np.ndarray, wrong: np.ndarray, seed: int = 0) -> dict:
    """Precision and recall of ``flagged`` for ``wrong`` answers (bool per image), with 95 % bootstrap intervals."""

    def rates(f: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        return (w[f].mean() if f.any() else np.nan, f[w].mean() if w.any() else np.nan)

    rng = np.random.default_rng(seed)
    draws = np.array([rates(flagged[i], wrong[i]) for i in rng.integers(0, len(wrong), (RESAMPLES, len(wrong)))])
    low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    precision, recall = rates(flagged, wrong)
    return {
        "images": int(len(wrong)),
        "wrong": int(wrong.sum()),
        "flagged": int(flagged.sum()),
        "flagged_wrong": int((flagged & wrong).sum()),
        "error_rate": float(wrong.mean()),
        "error_rate_unflagged": float(wrong[~flagged].mean()) if (~flagged).any() else None,
        "precision": float(precision),
        "precision_ci": [float(low[0]), float(high[0])],
        "recall": float(recall),
        "recall_ci": [float(low[1]), float(high[1])],
    }


def answers(checkpoint: Path, predictor, test: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The model's flip-averaged answer (class index) for each row of ``test``, and where it came from."""
    report = read_evaluate_report(RUNS / str((predictor.checkpoint.get("config") or {}).get("name")))
    if report is not None and report.get("tta"):
        found = {r["image_id"]: CLASSES.index(r["predicted"]) for r in report["predictions"]}
        if set(test["image_id"]) <= set(found):
            return test["image_id"].map(found).to_numpy(), "the run's saved flip-averaged evaluate report"
    probs, _ = predictor.split_probabilities(frame_batches(test, tta=True), tta=True)
    return probs.argmax(axis=1), "a flip-averaged pass here"


def neighbour_flag(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    predictor, cases = model_cases(args.data, args.checkpoint, args.max_per_split)
    table, feats = cases.frame, cases.features
    split = table["split"].to_numpy()
    reference = np.flatnonzero(np.isin(split, REFERENCE_SPLITS))
    test_rows = np.flatnonzero(split == "test")
    labels = table["dx"].map(CLASSES.index).to_numpy()
    shares = knn_vote(feats[reference], labels[reference], feats[test_rows], NEIGHBOURS)
    answer, source = answers(args.checkpoint, predictor, table.iloc[test_rows].reset_index(drop=True))
    flagged = neighbours_disagree(shares, answer)
    wrong = answer != labels[test_rows]
    mel = labels[test_rows] == CLASSES.index("mel")
    return {
        "checkpoint": str(args.checkpoint.resolve().relative_to(ROOT)),
        "answers_from": source,
        "reference_images": int(len(reference)),
        "seconds": time.perf_counter() - t0,
        "all": flag_quality(flagged, wrong),
        "melanomas": flag_quality(flagged[mel], wrong[mel]),
    }


def member_flag(run: Path) -> dict | None:
    """The members-disagree flag of the published ensemble ``run`` on its test images; None without its members'
    records."""
    evaluation = read_evaluation(run)
    names = [m["run"] for m in evaluation.get("members") or []]
    if not names or not all((RUNS / n / "test_predictions.csv").is_file() for n in names):
        return None
    table, labels, probs, _, _ = read_predictions(run)
    ensemble = pd.Series(probs.argmax(axis=1), index=table["image_id"])
    own = []
    for name in names:
        member_table, _, member_probs, _, _ = read_predictions(RUNS / name)
        own.append(pd.Series(member_probs.argmax(axis=1), index=member_table["image_id"]).reindex(ensemble.index))
    votes = np.stack([o.to_numpy() for o in own])
    flagged = (votes != ensemble.to_numpy()).any(axis=0)
    return {"members": names, **flag_quality(flagged, ensemble.to_numpy() != labels)}


def pct(x: float | None) -> str:
    return "–" if x is None or np.isnan(x) else f"{x:.1%}"


def row(name: str, q: dict) -> str:
    ci = lambda key: f"{pct(q[key])} ({pct(q[key + '_ci'][0])}–{pct(q[key + '_ci'][1])})"  # noqa: E731
    return (
        f"| {name} | {q['images']} | {q['flagged']} ({q['flagged'] / q['images']:.1%}) | {ci('precision')} | "
        f"{pct(q['error_rate'])} / {pct(q['error_rate_unflagged'])} | {ci('recall')} ({q['flagged_wrong']} of "
        f"{q['wrong']}) |"
    )


def section(r: dict, command: str) -> list[str]:
    n = r["neighbours"]
    lines = [
        "## Disagreement flags beside the answer (`bench/disagreement.py`)",
        "",
        f"`{command}` on {r['date']}: `{n['checkpoint']}` on the test split, {n['reference_images']} train/val images "
        f"searched for each test image's {NEIGHBOURS} nearest confirmed cases; answers from {n['answers_from']}; "
        f"{r['machine']}; {n['seconds']:.0f} s, taken under load.",
        "",
        "A flag's *precision* is the share of the answers it flags that are wrong (compare the error rate of all "
        "answers, and of those it leaves alone); its *recall* the share of wrong answers it flags. 95 % bootstrap "
        f"intervals over the test images ({RESAMPLES} resamples).",
        "",
        "| flag | answers | flagged | precision | error rate: all / not flagged | recall |",
        "| --- | --- | --- | --- | --- | --- |",
        row(f"the {NEIGHBOURS} nearest confirmed cases disagree", n["all"]),
        row("… on the melanomas alone", n["melanomas"]),
    ]
    for name, q in r["ensembles"].items():
        lines.append(row(f"the models of `{name}` disagree ({len(q['members'])} models)", q))
    if not r["full_dataset"]:
        lines += ["", PROOF_NOTE]
    return lines


def main() -> None:
    args = case_arguments(__doc__).parse_args()
    command = ("python -m bench.disagreement " + " ".join(sys.argv[1:])).strip()
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "full_dataset": not args.max_per_split,
        "neighbours": neighbour_flag(args),
        "ensembles": {run.name: q for run in sorted(RUNS.glob("ensemble-*")) if (q := member_flag(run)) is not None},
    }
    write_section(args.out, OWNER, section(results, command))
    update_json(args.out.with_suffix(".json"), {OWNER: results})
    print("\n".join(section(results, command)))


if __name__ == "__main__":
    main()
