"""Similar cases and the unfamiliar-image warning, measured on the model's test split.

    python -m bench.similar                                   # the full dataset, checkpoints/reference.pt
    python -m bench.similar --max-per-split 60 --no-save      # a quick proof on a few images

1. Builds (or reuses) the case index of the dataset under the model (``core.inference.similar``), with progress.
2. kNN vote: each test image's ``k`` nearest train/val images vote for its class; compared with the classifier
   (the model's own head on the same features, temperature-scaled) on the same test images.
3. Unfamiliar images: the detector of ``core.inference.unfamiliar`` keeps train-split features for its feature
   distance and fits its combined score on the val split's dermoscopy against the ``fit/`` part of
   ``tests/data/unfamiliar`` (non-dermoscopic pictures, ``tests/data/make_unfamiliar.py``), its threshold on the val
   split. Measured on the test split's dermoscopy against the ``held-out/`` part (pictures never fitted on): AUROC,
   false alarms and detections by kind, for the combined score (what the app shows), the feature distance alone
   (the check before issue 24, threshold at the val split's 99 % quantile) and the colour heuristic alone (what a
   model without a detector shows); each kind's detection again with that kind left out of the fit altogether; the
   bundled sample's images flagged. Every picture is scored as the app scores an upload. Saves the detector beside
   the checkpoint unless ``--no-save``.

Writes its section of docs/BENCHMARKS.md, its key of docs/BENCHMARKS.json and the model card's section.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from bench.benchmarks import DEFAULT_DATA, machine
from bench.model_card import KS, REFERENCE_COMMAND, card, comparison_runs, retrieval_table, unfamiliar_lines
from bench.report import update_json, write_section
from core.common import settings
from core.common.labels import CLASSES
from core.data.dataset import index_dataset
from core.data.preprocessing import Preprocessing, load_for_model
from core.data.splits import model_split, split_column
from core.inference.opening import open_predictor
from core.inference.predictor import Predictor
from core.inference.similar import REFERENCE_SPLITS, CaseIndex, build_index, knn_vote
from core.inference.unfamiliar import (
    ImageCheck,
    UnfamiliarDetector,
    dermoscopy_check,
    detector_path,
    file_digest,
    fit_detector,
)
from core.metrics.calibration import softmax
from core.metrics.classification import compute_metrics
from core.models.checkpoints import load_model

ROOT = Path(__file__).resolve().parents[1]


OWNER = "similar"
UNFAMILIAR = ROOT / "tests" / "data" / "unfamiliar"
SAMPLE = ROOT / "sample_data" / "ham10000-sample"
BATCH = 32


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def headline(m: dict) -> dict:
    mel = m["melanoma"]
    return {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro"]["f1"],
        "mel_sensitivity": mel.get("sensitivity"),
        "mel_auc": m["roc_auc"]["per_class"]["mel"],
    }


def classifier_probs(checkpoint: Path, features: np.ndarray) -> np.ndarray:
    """The model's calibrated probabilities from pooled features: its head, then its temperature."""
    model, ckpt = load_model(checkpoint)
    with torch.inference_mode():
        logits = model.head.eval()(torch.from_numpy(features)).numpy()
    return softmax(logits, float(ckpt["temperature"]))


def rates(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def model_cases(data: Path, checkpoint: Path, max_per_split: int = 0) -> tuple[Predictor, CaseIndex]:
    """The model and the case index of the dataset under it, each image with its split for that model (at most
    ``max_per_split`` images of each split for a quick proof), built or reused with progress on the terminal."""
    t0 = time.perf_counter()
    index = index_dataset(data)
    predictor = open_predictor(checkpoint)
    record = model_split(checkpoint, predictor.checkpoint, index.frame, settings.run_folders())
    frame = index.frame.assign(split=split_column(index.frame, record.split_of).to_numpy())
    if max_per_split:
        shuffled = frame.sample(frac=1.0, random_state=0)
        frame = shuffled.groupby("split", group_keys=False).head(max_per_split).reset_index(drop=True)
    print(f"{len(frame)} images, split {record.source}", flush=True)

    def progress(done: int, total: int) -> None:
        if done == total or done % 640 < 64:
            print(f"  features {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)

    return predictor, build_index(checkpoint, frame, frame["split"], progress=progress)


def measure(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    predictor, cases = model_cases(args.data, args.checkpoint, args.max_per_split)
    index_s = time.perf_counter() - t0
    table, feats = cases.frame, cases.features
    by = {s: np.flatnonzero(table["split"].to_numpy() == s) for s in ("train", "val", "test")}
    labels = {s: table["dx"].map(CLASSES.index).to_numpy()[rows] for s, rows in by.items()}
    reference = np.concatenate([by[s] for s in REFERENCE_SPLITS])
    ref_labels = table["dx"].map(CLASSES.index).to_numpy()[reference]

    retrieval = {
        "classifier": headline(compute_metrics(labels["test"], classifier_probs(args.checkpoint, feats[by["test"]])))
    }
    for k in KS:
        probs = knn_vote(feats[reference], ref_labels, feats[by["test"]], k)
        retrieval[f"knn{k}"] = headline(compute_metrics(labels["test"], probs))

    prep = Preprocessing.from_dict(predictor.checkpoint["preprocessing"])
    t1 = time.perf_counter()
    derm_checks = {
        split: [dermoscopy_check(load_for_model(p, prep)) for p in table["path"].to_numpy()[by[split]]]
        for split in ("val", "test")
    }
    parts = {part: sorted((UNFAMILIAR / part).glob("*.jpg")) for part in ("fit", "held-out")}
    pictures = {part: uploads(predictor, files) for part, files in parts.items()}
    print(f"colour statistics and upload features: {time.perf_counter() - t1:.0f} s", flush=True)
    detector = fit_detector(
        feats[by["train"]],
        feats[by["val"]],
        derm_checks["val"],
        *pictures["fit"],
        checkpoint_sha1=file_digest(args.checkpoint),
    )
    unfamiliar = measure_unfamiliar(detector, feats[by["val"]], feats[by["test"]], derm_checks, parts, pictures)
    unfamiliar["sample_flagged"] = sample_flagged(predictor, detector)
    unfamiliar["by_kind_left_out"] = left_out_kinds(
        feats[by["train"]], feats[by["val"]], derm_checks["val"], parts, pictures
    )
    if not args.no_save:
        detector.save(detector_path(args.checkpoint))
        print(f"saved {detector_path(args.checkpoint)}", flush=True)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "data": str(args.data),
        "checkpoint": shown(args.checkpoint),
        "images": int(len(table)),
        "splits": {s: int(len(rows)) for s, rows in by.items()},
        "index_seconds": index_s,
        "total_seconds": time.perf_counter() - t0,
        "retrieval": retrieval,
        "unfamiliar": unfamiliar,
        "full_dataset": not args.max_per_split,
    }


def uploads(predictor: Predictor, files: list[Path]) -> tuple[np.ndarray, list[ImageCheck]]:
    """The pooled features and colour checks of ``files`` decoded as the app decodes an upload, in batches."""
    features, checks = [], []
    for start in range(0, len(files), BATCH):
        inputs = [predictor.preprocess(f) for f in files[start : start + BATCH]]
        with torch.inference_mode():
            features.append(predictor.model.backbone(torch.cat([x for _, x in inputs])).float().numpy())
        checks += [dermoscopy_check(image) for image, _ in inputs]
    return np.concatenate(features), checks


def kind_of(path: Path) -> str:
    return path.stem.split("-")[0]


def by_kind(files: list[Path], flagged: np.ndarray) -> dict[str, dict]:
    kinds = pd.Series([kind_of(f) for f in files])
    return {
        kind: {"n": int((kinds == kind).sum()), "detected": rates(flagged[(kinds == kind).to_numpy()])}
        for kind in sorted(kinds.unique())
    }


def measure_unfamiliar(
    detector: UnfamiliarDetector,
    val: np.ndarray,
    test: np.ndarray,
    derm_checks: dict[str, list[ImageCheck]],
    parts: dict[str, list[Path]],
    pictures: dict[str, tuple[np.ndarray, list[ImageCheck]]],
) -> dict:
    """The combined score on the test split's dermoscopy against the held-out pictures, beside the feature distance
    alone (its threshold the val split's 99 % quantile, as before issue 24) and the colour heuristic alone."""
    held_feats, held_checks = pictures["held-out"]
    fit_feats, fit_checks = pictures["fit"]
    thr = detector.threshold
    derm = detector.image_scores(test, derm_checks["test"])
    held = detector.image_scores(held_feats, held_checks)
    fitted = detector.image_scores(fit_feats, fit_checks)
    distance_thr = float(np.quantile(detector.distances(val), 0.99))
    derm_distance, held_distance = detector.distances(test), detector.distances(held_feats)
    derm_colour = np.array([not c.looks_dermoscopic for c in derm_checks["test"]])
    held_colour = np.array([not c.looks_dermoscopic for c in held_checks])
    truth = np.r_[np.zeros(len(derm)), np.ones(len(held))]
    files = parts["held-out"]
    return {
        "k": detector.k,
        "reference_rows": len(detector.reference),
        "threshold": thr,
        "val_false_alarm_target": detector.val_false_alarm,
        "val_dermoscopy": len(val),
        "test_dermoscopy": len(derm),
        "fit_pictures": len(parts["fit"]),
        "held_out_pictures": len(files),
        "kinds": len({kind_of(f) for f in files}),
        "auroc": {
            "combined": float(roc_auc_score(truth, np.r_[derm, held])),
            "distance": float(roc_auc_score(truth, np.r_[derm_distance, held_distance])),
        },
        "false_alarm": {
            "combined": rates(derm > thr),
            "distance": rates(derm_distance > distance_thr),
            "colour": rates(derm_colour),
        },
        "detected": {
            "combined": rates(held > thr),
            "distance": rates(held_distance > distance_thr),
            "colour": rates(held_colour),
        },
        "fit_detected": rates(fitted > thr),
        "detected_by_kind": {
            kind: {**row, "distance": rates(held_distance[mask] > distance_thr), "colour": rates(held_colour[mask])}
            for kind, row in by_kind(files, held > thr).items()
            for mask in [np.array([kind_of(f) == kind for f in files])]
        },
        "missed": [f.name for f, score in zip(files, held, strict=True) if score <= thr],
    }


def left_out_kinds(
    train: np.ndarray,
    val: np.ndarray,
    val_checks: list[ImageCheck],
    parts: dict[str, list[Path]],
    pictures: dict[str, tuple[np.ndarray, list[ImageCheck]]],
) -> dict[str, float]:
    """Each kind's held-out detection by a detector fitted without any picture of that kind: how the score does on a
    kind of picture nobody thought of."""
    fit_kinds = np.array([kind_of(f) for f in parts["fit"]])
    held_kinds = np.array([kind_of(f) for f in parts["held-out"]])
    fit_feats, fit_checks = pictures["fit"]
    held_feats, held_checks = pictures["held-out"]
    detected = {}
    for kind in sorted(set(held_kinds)):
        keep = np.flatnonzero(fit_kinds != kind)
        detector = fit_detector(train, val, val_checks, fit_feats[keep], [fit_checks[i] for i in keep])
        rows = np.flatnonzero(held_kinds == kind)
        scores = detector.image_scores(held_feats[rows], [held_checks[i] for i in rows])
        detected[kind] = rates(scores > detector.threshold)
    return detected


def sample_flagged(predictor: Predictor, detector: UnfamiliarDetector) -> dict:
    """The bundled sample's images (real HAM10000 dermoscopy) that the check flags when uploaded."""
    files = sorted(SAMPLE.rglob("*.jpg"))
    features, checks = uploads(predictor, files)
    flagged = detector.image_scores(features, checks) > detector.threshold
    return {"images": len(files), "flagged": [f.name for f, hit in zip(files, flagged, strict=True) if hit]}


def section(r: dict, command: str) -> list[str]:
    u = r["unfamiliar"]
    lines = [
        "## Similar cases and the unfamiliar-image warning (`bench/similar.py`)",
        "",
        f"`{command}` on {r['date']}: {r['images']} images ({r['splits']['train']} train, {r['splits']['val']} val, "
        f"{r['splits']['test']} test) under `{r['checkpoint']}`; {r['machine']}.",
        "",
        f"Indexing the dataset and building the case index: {r['index_seconds']:.0f} s (the pooled features of "
        "every image are computed once and then read back from `.cache/features`); "
        f"{r['total_seconds']:.0f} s in all.",
        "",
        *retrieval_table(r),
        "",
        *unfamiliar_lines(u),
    ]
    if not r["full_dataset"]:
        lines += ["", PROOF_NOTE]
    return lines


PROOF_NOTE = "A proof run on a few images per split: the numbers show that the script works, nothing more."


def case_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark over a model's case index: the dataset, the model, a quick proof's size and the
    Markdown file its section goes to."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "reference.pt")
    p.add_argument("--max-per-split", type=int, default=0, help="a quick proof: at most this many images per split")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    return p


def main() -> None:
    p = case_arguments(__doc__)
    p.add_argument("--no-save", action="store_true", help="do not save the fitted detector beside the checkpoint")
    args = p.parse_args()
    command = "python -m bench.similar " + " ".join(sys.argv[1:])
    results = measure(args)
    write_section(args.out, OWNER, section(results, command.strip()))
    update_json(args.out.with_suffix(".json"), {OWNER: results})
    print("\n".join(section(results, command.strip())))
    if results["full_dataset"]:
        reference = ROOT / "docs" / "runs" / "reference-mnv2"
        (ROOT / "MODEL_CARD.md").write_text(
            card(reference, comparison_runs("", ROOT / "docs" / "runs"), REFERENCE_COMMAND, ROOT / "docs" / "runs")
        )


if __name__ == "__main__":
    main()
