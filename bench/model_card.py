"""Train the comparison runs (if missing) and write MODEL_CARD.md from run folders.

    python -m bench.model_card --reference docs/runs/reference-mnv2 --runs docs/runs
    python -m bench.model_card --data ../shared/data/ham10000-200x150 --reference runs/reference-mnv2 --train

Every number in the card is computed here from the runs' ``test_predictions.csv`` (the
lesion-grouped test split of ``split_by_lesion(seed=0)``, calibrated by temperature
scaling fitted on the validation split), so the card can be regenerated at any time.
With ``--train``, the seed pipeline and one run per imbalance strategy are trained
first (head-only on cached features; skipped when their run folder is complete).
``docs/runs/`` keeps the text files of the runs behind the published card (no checkpoints).
The card's wording is ``bench/templates/model_card.md.j2``; this script computes what it shows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bench.fitting import RULES, shown_images
from bench.fitting import table as fitting_table
from core.common.files import read_json
from core.common.labels import CLASSES
from core.common.runs import (
    EVALUATE_FILE,
    RunState,
    has_evaluation,
    lesions_of,
    read_config,
    read_evaluate_report,
    read_predictions,
    read_run,
    read_split,
)
from core.data.dataset import UNKNOWN_SOURCE, DatasetError, index_dataset
from core.data.images import FIT_RULE
from core.data.shifts import JPEG_QUALITY
from core.data.splits import holdout_sources
from core.evaluation import robustness
from core.evaluation.choice import RULE, candidate_runs, choose, holdout_runs_of, judge, read_record
from core.evaluation.choice import recipe as choice_recipe
from core.evaluation.records import report_predictions
from core.evaluation.sources import holdout_report, markdown_groups, metrics_by_source
from core.inference.similar import NEIGHBOURS
from core.metrics.bootstrap import bootstrap_ci, confidence_intervals, paired_bootstrap_ci
from core.metrics.calibration import expected_calibration_error, softmax
from core.metrics.classification import (
    MALIGNANT_RULE,
    MELANOMA_RULE,
    REFERRAL_RULES,
    balanced_accuracy,
    compute_metrics,
    macro_auc,
    melanoma_auc,
    operating_point,
    weighted_f1,
)
from core.models.ensemble_file import read_model_file
from core.training.config import TrainConfig, config_with
from core.training.imbalance import STRATEGIES
from core.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


REFERENCE_COMMAND = (
    "lesionlab train --preset reference --data ../shared/data/ham10000-200x150 --out runs --name reference-mnv2"
)
BENCHMARKS_JSON = ROOT / "docs" / "BENCHMARKS.json"
# What the model choice compares recipes with: a field an older run's config lacks is the trainer's default, since
# the run was trained before the field existed.
RECIPE_DEFAULTS = TrainConfig().to_dict()
METADATA_RESULTS = ROOT / "docs" / "metadata-results.json"  # written by bench/metadata.py
KS = (1, NEIGHBOURS, 32)  # the kNN votes compared with the classifier; NEIGHBOURS is what Diagnose shows
# ImageNet ResNet-18 weights cannot be downloaded on the project's machines; MobileNetV2's ship in a package.
COMPARISON_ARCH = "mobilenet_v2"


def comparison_runs(data: str, out: Path) -> dict[str, Path]:
    """The seed pipeline with each imbalance strategy (``oversample`` is the seed itself)."""
    return {s: out / f"compare-{COMPARISON_ARCH}-{s}" for s in STRATEGIES}


def train_comparisons(data: str, out: Path) -> None:
    for strategy, run_dir in comparison_runs(data, out).items():
        if has_evaluation(run_dir):
            continue
        cfg = config_with("seed", data=data, arch=COMPARISON_ARCH, imbalance=strategy, out=str(out), name=run_dir.name)
        print(f"training {run_dir.name}", flush=True)
        train(cfg, run_dir=run_dir, resume=(run_dir / "last.pt").is_file())


def load_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Test labels, calibrated and uncalibrated probabilities (from the logits), and the fitted temperature."""
    _, labels, _, logits, evaluation = read_predictions(run_dir)
    temperature = evaluation["temperature"]
    return labels, softmax(logits, temperature), softmax(logits), temperature


def test_lesions(run_dir: Path) -> list[str]:
    """The lesion of each of the run's test predictions, in their order: the card's intervals resample lesions."""
    return lesions_of(run_dir, read_predictions(run_dir)[0]["image_id"].astype(str).tolist())


def load_evaluate_report(run_dir: Path) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Test labels and calibrated probabilities as ``lesionlab evaluate`` read them at its defaults (flip
    TTA), from the report saved in the run folder, with the report; None without one."""
    report = read_evaluate_report(run_dir)
    if report is None:
        return None
    labels, probs = report_predictions(report)
    return labels, probs / probs.sum(axis=1, keepdims=True), report


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def all_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    raw: np.ndarray | None,
    thresholds: dict[str, float],
    lesions: list[str],
) -> dict[str, str]:
    """The 95% bootstrap interval (2000 resamples of the test images' ``lesions``) of every metric in the card's
    table, formatted "low–high". ``thresholds``: each referral rule's, by its field (``mel_threshold``, …)."""
    rate = lambda name, t, rule=MELANOMA_RULE: lambda y, p: operating_point(y, p, t, rule)[name]  # noqa: E731
    ci = confidence_intervals(labels, probs, n=2000, groups=lesions)
    on_calibrated = {
        "weighted_f1": weighted_f1,
        "mel_auc": melanoma_auc,
        "macro_auc": macro_auc,
        **{
            f"{rule.key}_op_{name}": rate(name, thresholds[rule.field], rule)
            for rule in REFERRAL_RULES
            if rule.field in thresholds
            for name in ("sensitivity", "specificity")
        },
        "sensitivity": rate("sensitivity", 0.5),
        "specificity": rate("specificity", 0.5),
        "ece": expected_calibration_error,
    }
    ci |= {name: bootstrap_ci(labels, probs, fn, n=2000, groups=lesions) for name, fn in on_calibrated.items()}
    if raw is not None:
        ci["ece_raw"] = bootstrap_ci(labels, raw, expected_calibration_error, n=2000, groups=lesions)
    return {name: f"{fmt(low)}–{fmt(high)}" for name, (low, high) in ci.items()}


def per_class_intervals(
    labels: np.ndarray, probs: np.ndarray, lesions: list[str], n: int = 1000
) -> dict[str, dict[str, str]]:
    """Each class's precision and recall with its 95% bootstrap interval over ``lesions``, formatted "low–high"."""

    def share(c: int, of_predicted: bool) -> Callable[[np.ndarray, np.ndarray], float]:
        def fn(y: np.ndarray, p: np.ndarray) -> float:
            predicted = p.argmax(axis=1) == c
            hits = (predicted & (y == c)).sum()
            return float(hits / max((predicted if of_predicted else y == c).sum(), 1))

        return fn

    out = {}
    for c, code in enumerate(CLASSES):
        out[code] = {
            name: "–".join(fmt(v) for v in bootstrap_ci(labels, probs, share(c, of_predicted), n=n, groups=lesions))
            for name, of_predicted in (("precision", True), ("recall", False))
        }
    return out


def interval(labels: np.ndarray, probs: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float]) -> str:
    """``fn``'s value with its 95% bootstrap interval (1000 resamples): "0.742 (0.701–0.781)"."""
    low, high = bootstrap_ci(labels, probs, fn, n=1000)
    return f"{fmt(fn(labels, probs))} ({fmt(low)}–{fmt(high)})"


# The card's prose lives in the template; card() computes and formats every value it shows. Markdown, not HTML: no
# autoescaping (it would turn the card's `>`, `&` and quotes into entities). Undefined names fail loudly.
CARD_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=False,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)

# The results table's metrics: each one's value in a compute_metrics() result (None: not read from one), by the key
# of its interval in all_intervals().
RESULT_VALUES: dict[str, Callable[[dict], float] | None] = {
    "accuracy": lambda r: r["accuracy"],
    "balanced_accuracy": lambda r: r["balanced_accuracy"],
    "macro_f1": lambda r: r["macro"]["f1"],
    "weighted_f1": lambda r: r["weighted"]["f1"],
    "mel_auc": lambda r: r["roc_auc"]["per_class"]["mel"],
    "melanoma_op_sensitivity": lambda r: r["melanoma"]["sensitivity"],
    "melanoma_op_specificity": lambda r: r["melanoma"]["specificity"],
    "malignant_op_sensitivity": lambda r: r["malignant"]["sensitivity"],
    "malignant_op_specificity": lambda r: r["malignant"]["specificity"],
    "sensitivity": lambda r: r["at_half"]["sensitivity"],
    "specificity": lambda r: r["at_half"]["specificity"],
    "macro_auc": lambda r: r["roc_auc"]["macro"],
    "ece_raw": None,  # before temperature scaling: from the uncalibrated probabilities, one view only
    "ece": lambda r: r["ece"],
}


def operating_thresholds(reference: Path) -> dict[str, float]:
    """The referral thresholds Diagnose uses for the reference run's model, by field: the run's record
    (``evaluation.json``), completed by the published model file trained by that run (``checkpoints/NAME.pt``, whose
    stored config names it), which ``lesionlab operating-point`` may have given a rule the run never recorded."""
    recorded = read_json(reference / "evaluation.json")
    found = {rule.field: recorded[rule.field] for rule in REFERRAL_RULES if recorded.get(rule.field) is not None}
    for path in sorted((ROOT / "checkpoints").glob("*.pt")):
        payload = read_model_file(path)
        if (payload.get("config") or {}).get("name") == reference.name:
            found |= {r.field: payload[r.field] for r in REFERRAL_RULES if r.field not in found and r.field in payload}
    return found


def scored(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float]) -> dict:
    """``compute_metrics`` at the model's operating points (each rule's sensitivity and specificity under its key;
    a rule without a threshold scored at 0.5), with the melanoma rule at P(mel) ≥ 0.5 beside them as ``at_half``."""
    return {
        **compute_metrics(labels, probs, **thresholds),
        "at_half": compute_metrics(labels, probs)["melanoma"],
    }


def card(reference: Path, comparisons: dict[str, Path], command: str, runs: Path, data: str | None = None) -> str:
    labels, probs, raw, temperature = load_predictions(reference)
    m = compute_metrics(labels, probs)
    m_raw = compute_metrics(labels, raw)
    cfg = read_config(reference)
    # The operating points Diagnose uses: the model's own, chosen on validation (core.evaluation.operating_point),
    # else 0.5.
    thresholds = operating_thresholds(reference)
    one = scored(labels, probs, thresholds)
    lesions = test_lesions(reference)
    ci = all_intervals(labels, probs, raw, thresholds, lesions)
    # The targets are read as lesionlab evaluate reads the model: its saved report, when there is one.
    tta, tta_ci, evaluated = None, {}, load_evaluate_report(reference)
    if evaluated is not None:
        t_labels, t_probs, _ = evaluated
        tta = scored(t_labels, t_probs, thresholds)
        t_lesions = lesions_of(reference, [r["image_id"] for r in evaluated[2]["predictions"]])
        tta_ci = all_intervals(t_labels, t_probs, None, thresholds, t_lesions)
    read = tta or one
    sizes = read_split(reference)["split"].value_counts()
    results = {}
    for key, value in RESULT_VALUES.items():
        results[key] = {
            "one": fmt(m_raw["ece"]) if value is None else fmt(value(one)),
            "one_ci": ci.get(key, "–"),
            "tta": "–" if tta is None or value is None else fmt(value(tta)),
            "tta_ci": "–" if tta is None else tta_ci.get(key, "–"),
        }
    class_ci = per_class_intervals(labels, probs, lesions)
    per_class = [
        {
            "code": r["code"],
            "name": r["name"],
            "precision": fmt(r["precision"]),
            "precision_ci": class_ci[r["code"]]["precision"],
            "recall": fmt(r["recall"]),
            "recall_ci": class_ci[r["code"]]["recall"],
            "f1": fmt(r["f1"]),
            "auc": fmt(r["auc"]),
            "support": str(r["support"]),
        }
        for r in m["per_class"]
    ]
    met, missed = target_verdicts(read)
    latency = diagnose_latency()
    if latency is not None:
        met.append(f"a Diagnose answer ≤ 300 ms p50 on the 2-core CPU with flip TTA ({latency:.0f} ms)")
    comparison = [{"strategy": s, **comparison_row(d)} for s, d in comparisons.items() if has_evaluation(d)]
    comparison.append({"strategy": None, **comparison_row(reference)})
    context = {
        "cfg": {k: f"{v}" for k, v in cfg.items()},
        "class_weight_power": f"{cfg.get('class_weight_power', 1.0)}",
        "classes": list(CLASSES),
        "fit_rule": FIT_RULE,
        "fit_rule_text": RULES[FIT_RULE],
        "temperature": f"{temperature:.3f}",
        "sizes": {split: str(sizes.get(split, 0)) for split in ("train", "val", "test")},
        "command": command,
        "wall_minutes": f"{read_run(reference).wall_time_s / 60:.0f}",
        "gpu_wall": gpu_wall(),
        "n_test": str(m["n"]),
        "evaluate_file": EVALUATE_FILE,
        "results": results,
        "rules": {
            rule.key: {
                "threshold": f"{one[rule.key]['threshold']:.3f}",
                "goal": f"{rule.sensitivity:.2f}",
                "recorded": rule.field in thresholds,
            }
            for rule in REFERRAL_RULES
        },
        "per_class": per_class,
        "confusion": [(code, [str(v) for v in row]) for code, row in zip(CLASSES, m["confusion_matrix"], strict=True)],
        "tta": tta is not None,
        "met": met,
        "missed": missed,
        "read_op": {
            key: {"sensitivity": fmt(read[key]["sensitivity"]), "specificity": fmt(read[key]["specificity"])}
            for key in (MELANOMA_RULE.key, MALIGNANT_RULE.key)
        },
        "one_view_op_sensitivity": fmt(one["melanoma"]["sensitivity"]),
        "comparison_arch": COMPARISON_ARCH,
        "comparison": comparison,
        "sections": {
            "similar": similar_lines(),
            "robustness": robustness_lines(reference),
            "sources": source_lines(reference, runs, data),
            "choice": choice_lines(reference, runs, data),
            "metadata": metadata_lines(),
            "ensembles": ensemble_lines(runs, reference),
            "recipes": recipe_lines(runs),
            "backbones": backbone_lines(),
            "did_not_help": did_not_help_lines(runs, reference),
        },
    }
    return CARD_TEMPLATES.get_template("model_card.md.j2").render(context)


def target_verdicts(read: dict) -> tuple[list[str], list[str]]:
    """The targets met (each with its measured value) and missed (with by how much), from ``read``'s metrics."""
    # (target, measured, goal, True when higher is better)
    targets = [
        ("accuracy ≥ 0.85", read["accuracy"], 0.85, True),
        ("balanced accuracy ≥ 0.80", read["balanced_accuracy"], 0.80, True),
        ("melanoma AUC ≥ 0.93", read["roc_auc"]["per_class"]["mel"] or 0.0, 0.93, True),
        ("ECE ≤ 0.03", read["ece"], 0.03, False),
        ("melanoma sensitivity ≥ 0.80 at the operating point", read["melanoma"]["sensitivity"] or 0.0, 0.80, True),
    ]
    met, missed = [], []
    for name, value, goal, up in targets:
        if value >= goal if up else value <= goal:
            met.append(f"{name} ({fmt(value)})")
        else:
            missed.append(f"{name} ({fmt(value)}, {abs(value - goal):.3f} {'short' if up else 'over'})")
    return met, missed


def comparison_row(run_dir: Path) -> dict[str, str]:
    """A run's line in the comparison table: its test metrics from its own record, formatted."""
    r_labels, r_probs, _, _ = load_predictions(run_dir)
    r = compute_metrics(r_labels, r_probs)
    mel_row = r["per_class"][CLASSES.index("mel")]
    return {
        "accuracy": fmt(r["accuracy"]),
        "balanced_accuracy": fmt(r["balanced_accuracy"]),
        "macro_f1": fmt(r["macro"]["f1"]),
        "weighted_f1": fmt(r["weighted"]["f1"]),
        "mel_precision": fmt(mel_row["precision"]),
        "mel_recall": fmt(mel_row["recall"]),
        "mel_auc": fmt(r["roc_auc"]["per_class"]["mel"]),
    }


def diagnose_latency() -> float | None:
    """The reference model's p50 ms per Diagnose answer with its default TTA (bench/diagnose_cost.py)."""
    costs = (read_json(BENCHMARKS_JSON) if BENCHMARKS_JSON.is_file() else {}).get("diagnose_cost") or {}
    for model in costs.get("models", []):
        if model["model"].endswith("checkpoints/reference.pt"):
            return next(v["p50_ms"] for k, v in model["cost"].items() if k != "none")
    return None


def gpu_wall() -> dict[str, str] | None:
    """The reference preset's wall time on a GPU, where bench/pipeline.py --gpu-only measured it."""
    g = read_json(BENCHMARKS_JSON).get("pipeline_gpu") if BENCHMARKS_JSON.is_file() else None
    if not g:
        return None
    return {"device": g["device"], "seconds": f"{g['reference_wall_s']:.0f}", "date": g["date"][:10]}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def retrieval_table(r: dict) -> list[str]:
    rows = [("classifier (softmax, calibrated)", r["retrieval"]["classifier"])]
    rows += [(f"kNN vote, k = {k} train/val neighbours", r["retrieval"][f"knn{k}"]) for k in KS]
    lines = [
        "| on the test split | accuracy | balanced acc. | macro F1 | mel sensitivity | mel AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {fmt(m['accuracy'])} | {fmt(m['balanced_accuracy'])} | {fmt(m['macro_f1'])} | "
            f"{pct(m['mel_sensitivity'])} | {fmt(m['mel_auc'])} |"
        )
    return lines


def unfamiliar_lines(u: dict) -> list[str]:
    """What the unfamiliar-image check measures, from ``bench/similar.py``'s record: the combined score beside the
    feature distance and the colour heuristic alone, and its detection of each kind of picture."""
    auroc, fa, det = u["auroc"], u["false_alarm"], u["detected"]
    kinds = u["detected_by_kind"]
    left_out = u["by_kind_left_out"]
    sample = u["sample_flagged"]
    lines = [
        "The unfamiliar-image check is one combined score: a logistic regression over the feature distance (cosine "
        f"distance to the {u['k']}th-nearest of {u['reference_rows']} training images) and colour and texture "
        "statistics of the image (its shares of grey, white, black and reddish pixels, saturation, hue, brightness, "
        f"edges, colourfulness), fitted on {u['val_dermoscopy']} validation dermoscopy images against "
        f"{u['fit_pictures']} generated non-dermoscopic pictures (`tests/data/unfamiliar/fit`). Its threshold "
        f"({u['threshold']:.3f}) is exceeded by {u['val_false_alarm_target']:.1%} of validation dermoscopy (scored "
        f"out of fold). Measured on {u['test_dermoscopy']} test dermoscopy images against {u['held_out_pictures']} "
        f"pictures of {u['kinds']} kinds that were never fitted on (`tests/data/unfamiliar/held-out`): "
        f"**AUROC {auroc['combined']:.3f}, {pct(fa['combined'])} false alarms on test dermoscopy, "
        f"{pct(det['combined'])} of the pictures detected**.",
        "",
        "| rule | AUROC | false alarms on test dermoscopy | held-out pictures detected |",
        "| --- | --- | --- | --- |",
        f"| combined score (what the app uses) | **{auroc['combined']:.3f}** | **{pct(fa['combined'])}** | "
        f"**{pct(det['combined'])}** |",
        f"| feature distance alone (the check before, threshold at the validation split's 99 % quantile) | "
        f"{auroc['distance']:.3f} | {pct(fa['distance'])} | {pct(det['distance'])} |",
        f"| colour heuristic alone (models without a detector) | – | {pct(fa['colour'])} | {pct(det['colour'])} |",
        "",
        "Held-out pictures detected, by kind (the file name's prefix); *kind left out*: the same pictures by a score "
        "fitted without any picture of that kind, as a kind nobody thought of would fare:",
        "",
        "| kind | pictures | combined score | kind left out of the fit | distance alone | colour alone |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {kind} | {row['n']} | {pct(row['detected'])} | {pct(left_out[kind])} | {pct(row['distance'])} | "
            f"{pct(row['colour'])} |"
            for kind, row in kinds.items()
        ),
        "",
        f"On the {u['fit_pictures']} pictures it was fitted on it detects {pct(u['fit_detected'])}. "
        + (f"Missed: {', '.join(u['missed'])}. " if u["missed"] else "No held-out picture was missed. ")
        + "The bundled sample (`sample_data/ham10000-sample`, real HAM10000 dermoscopy): "
        + (
            f"{len(sample['flagged'])} of {sample['images']} flagged ({', '.join(sample['flagged'])})."
            if sample["flagged"]
            else f"none of its {sample['images']} images flagged."
        ),
        "",
        "The clinical close-ups are generated (a small mole on drawn skin with pores, redness, hair and light); they "
        "are no proof for real clinical photographs, which look more like dermoscopy: treat those as the check's "
        "weak spot. The other kinds mix packaged photographs (scikit-image, scikit-learn, Matplotlib) with "
        "generated pictures.",
    ]
    return lines


def similar_lines() -> list[str]:
    """The kNN-versus-classifier comparison and the unfamiliar-image measurement, from ``bench/similar.py``'s
    full-dataset run recorded in docs/BENCHMARKS.json (nothing when it has not run)."""
    r = (read_json(BENCHMARKS_JSON) if BENCHMARKS_JSON.is_file() else {}).get("similar")
    if not r or not r.get("full_dataset"):
        return []
    return [
        "",
        "## Similar cases: a kNN vote beside the classifier",
        "",
        "Diagnose shows the training and validation images nearest to an upload in the model's pooled features. "
        "Voting with those neighbours (test images never among them) classifies the test split about as the "
        "study of Tschandl et al. (JAMA Dermatology 2019) found for retrieval against softmax "
        "(`bench/similar.py`, docs/BENCHMARKS.md):",
        "",
        *retrieval_table(r),
        "",
        "## Unfamiliar images",
        "",
        *unfamiliar_lines(r["unfamiliar"]),
    ]


def sourced_frame(data: str | None):
    """The index of the dataset in ``data`` when it knows its images' sources, else None."""
    try:
        frame = index_dataset(data).frame if data else None
    except DatasetError:
        return None
    return frame if frame is not None and (frame["source"] != UNKNOWN_SOURCE).any() else None


def source_lines(reference: Path, runs: Path, data: str | None) -> list[str]:
    """Results by image source, from the reference's recorded test predictions (its ``lesionlab evaluate`` report
    when saved, else the trainer's) and the sources of the dataset in ``data``, and the leave-one-source-out runs found
    in ``runs``; a line saying what is missing when the dataset or its sources are not there."""
    frame = sourced_frame(data)
    if frame is None:
        return ["", "## Results by image source", "", f"Not computed: no dataset with image sources at {data}."]
    evaluated = load_evaluate_report(reference)
    if evaluated is not None:
        labels, probs, report = evaluated
        image_ids = [r["image_id"] for r in report["predictions"]]
        how = f"as `lesionlab evaluate` read them ({EVALUATE_FILE}, flip TTA)"
    else:
        table, labels, probs, _, _ = read_predictions(reference)
        image_ids = table["image_id"].astype(str).tolist()
        how = "as the trainer recorded them (one view)"
    known = frame.drop_duplicates("image_id").set_index("image_id")
    present = np.isin(image_ids, known.index)  # a record from another copy of the dataset may name images not here
    rows = known.loc[np.asarray(image_ids)[present]].reset_index()
    labels, probs = labels[present], probs[present]
    if not present.all():
        how += f"; {present.sum()} of its {len(present)} images are in {data}"
    threshold = read_json(reference / "evaluation.json").get("mel_threshold") or 0.5
    by_source = metrics_by_source(rows, labels, probs, mel_threshold=threshold, bootstrap=1000)
    lines = [
        "",
        "## Results by image source",
        "",
        f"The test split's predictions {how}, by the source of each image (`HAM10000_sources.csv`); melanoma "
        f"sensitivity and specificity at the operating point P(mel) ≥ {threshold:.3f}; 95% intervals from 1000 "
        "bootstrap resamples of the lesions.",
        "",
        *markdown_groups(by_source),
    ]
    return lines + leave_one_source_out_lines(reference, runs, frame)


def leave_one_source_out_lines(reference: Path, runs: Path, frame) -> list[str]:
    """The runs in ``runs`` trained without one source (``lesionlab train --leave-one-source-out``), tested on it,
    saying whether they are of the bundled model's recipe (``reference``'s run) or a candidate's."""
    eligible, left_out = holdout_sources(frame)
    holdouts = sorted(
        d for d in runs.glob("*") if (d / "config.json").is_file() and read_config(d).get("holdout_source")
    )
    holdouts = [d for d in holdouts if has_evaluation(d)]
    reasons = "; ".join(f"{s}: {why}" for s, why in left_out.items())
    lines = [
        "",
        "### Leave one source out",
        "",
        f"A model trained and validated on the other sources and tested on one: {', '.join(eligible) or 'no source'} "
        "can be held out"
        + (f"; the others hold too few classes to be tested on alone ({reasons})." if reasons else "."),
        "",
    ]
    how = "`lesionlab train --preset reference --data DIR --leave-one-source-out`"
    if not holdouts:
        return [*lines, f"Not run yet: {how}."]
    own = set(holdout_runs_of(reference, runs, RECIPE_DEFAULTS))
    others = [d.name for d in holdouts if d not in own]
    lines += [
        "These runs are of the bundled model's recipe."
        if not others
        else (f"Of the bundled model's recipe: {', '.join(f'`{d.name}`' for d in sorted(own))}; " if own else "")
        + f"of candidates' recipes (each judged in the choice table below): {', '.join(f'`{n}`' for n in others)}"
        + ("." if own else f"; none of the bundled model's own (its recipe in full: {how})."),
        "",
    ]
    report = holdout_report(holdouts, left_out)
    # Named by run, not by source, once one source was held out by runs of more than one recipe.
    by_run = len({r["source"] for r in report["rows"]}) < len(report["rows"])
    lines += [*markdown_groups(report["rows"], "run" if by_run else "source"), ""]
    lines += [
        f"- `{r['run']}`: balanced accuracy {fmt(r['val_balanced_accuracy'])} on the validation split of the other "
        f"sources, {fmt(r['metrics']['balanced_accuracy'])} on {r['source']}."
        for r in report["rows"]
    ]
    return lines


def choice_lines(reference: Path, runs: Path, data: str | None) -> list[str]:
    """The rule that chooses the bundled model (:mod:`core.evaluation.choice`) and every candidate in ``runs``, with
    the bundled model's own run ``reference``, judged by it, kept or not. Which sources must have been held out comes
    from the dataset in ``data`` (without it, the held-out runs found are read as they are)."""
    frame = sourced_frame(data)
    sources = holdout_sources(frame)[0] if frame is not None else None
    found = {d.resolve(): d for d in [reference, *candidate_runs(runs)]}
    verdicts = [judge(read_record(d, runs, RECIPE_DEFAULTS), sources=sources) for d in found.values()]
    kept = choose(verdicts)
    lines = [
        "",
        "## Choosing the bundled model",
        "",
        "A candidate becomes the bundled model only if it passes every gate of a rule fixed before issue 22's "
        "candidates were trained (`core/evaluation/choice.py`), each read from its recorded results and none from "
        "the test split:",
        "",
        *(f"- {line}" for line in RULE.describe()),
        "",
        "Of those that pass, the one with the highest mean balanced accuracy on the held-out sources is kept "
        "(then the higher validation balanced accuracy); when none passes, the bundled model stays. Candidates are "
        "the finished runs that train their backbone (or ensembles of them) and hold out no source"
        + (f"; the sources that can be held out are {', '.join(sources)}." if sources else "."),
        "",
        "| run | val balanced acc. | held-out sources, mean balanced acc. | largest shift drop (val) | verdict | why |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in verdicts:
        r = v.record
        drops = r.shift_drops
        worst = f"{max(drops.values()):.3f} ({max(drops, key=drops.get)})" if drops else "–"
        title = f"`{r.run}`" + (" (bundled now)" if r.run == reference.name else "")
        verdict = ("**kept**" if v is kept else "passes") if v.passed else "fails"
        lines.append(
            f"| {title} | {fmt(r.val_balanced_accuracy)} | {fmt(r.holdout_mean)} | {worst} | {verdict} | "
            + "; ".join(v.reasons)
            + " |"
        )
    lines += [
        "",
        f"Kept: `{kept.record.run}`." if kept else "No candidate passes every gate: the bundled model stays as it is.",
    ]
    return lines


def robustness_lines(reference: Path) -> list[str]:
    """The robustness report saved in the reference run's folder (``lesionlab evaluate --shifts``) and the
    fitting-rule comparison of ``bench/fitting.py`` (docs/BENCHMARKS.json); nothing for what has not run."""
    report = robustness.read_robustness(reference)
    fitting = (read_json(BENCHMARKS_JSON) if BENCHMARKS_JSON.is_file() else {}).get("fitting")
    lines = []
    if report:
        lines += [
            "",
            "## Robustness to acquisition shifts",
            "",
            "The test split again, each image changed as an upload may differ from our 200×150 HAM10000 copies "
            "before the predictor's fitting: `lesionlab evaluate --checkpoint checkpoints/reference.pt --data "
            f"../shared/data/ham10000-200x150 --shifts`. {robustness.describe(report)}. Drop = clean − shifted; "
            "intervals from a paired bootstrap (the same resampled images under both conditions). Target: balanced "
            "accuracy drops by ≤ 0.03 under each shift.",
            "",
            *robustness.markdown_table(report),
        ]
        lines += shift_shortfall_lines(report)
        if report.get("sampled_from"):
            lines += [
                "",
                f"Measured on a random sample of the split (`--max-images {report['n_images']}`, 2-core CPU under "
                "shared load): its clean scores differ from the full split's above, and the intervals are wide. "
                "Rerun without `--max-images` for the whole split.",
            ]
    if fitting:
        lines += [
            "",
            "### Upload-fitting rule",
            "",
            f"Chosen on {shown_images(fitting)} (`bench/fitting.py`, {fitting['bootstrap']} "
            "paired resamples) under the shifts that change an image's shape; the 2× and ½ scale shifts keep the "
            "4:3 field, which every rule fits alike.",
            "",
            *fitting_table(fitting),
        ]
    return lines


# Why a shift costs more than the target allows, as far as the measurements say (keyed by core.data.shifts' names).
SHIFT_REASONS = {
    "scale_half": "a half-size image has a quarter of the pixels: brought back to 200×150 it has lost the fine "
    "structure, not only the scale. The `wide` recipe, trained on scales down to ½, all but removes this drop on "
    "validation (Training recipes, below), at a lower clean score",
    f"jpeg_q{JPEG_QUALITY}": "strong JPEG compression of a 200×150 image blurs and blocks the fine pigment "
    "network the model reads. Training on images saved again as JPEG (`--jpeg-quality`) targets it, and the "
    "shorter `onecycle` recipe (6 epochs, last epoch kept) drifts less under it than the reference recipe: what each "
    "did on validation is under Training recipes (one change at a time)",
    "warm_cast": "the colour jitter in training varies brightness, contrast, saturation and a little hue, not the "
    "gain of each channel that a different white balance applies. Shades of Gray colour constancy "
    "(`--colour-constancy shades_of_gray`) targets it: what it did on validation is under Training recipes (one "
    "change at a time)",
    "square_crop": "a square crop removes the sides of the field of view, and with them lesion borders",
    "rotate_90": "a portrait image keeps its scale but loses its top and bottom to the landscape input, and its "
    "sides are reflect-padded",
    "scale_2x": "a doubled image is brought back to 200×150 by downscaling, which should change little",
}
SHIFT_TARGET = 0.03


def shift_shortfall_lines(report: dict) -> list[str]:
    """Each shift whose balanced-accuracy drop exceeds the target, by how much and why."""
    missed = [
        (c["name"], c["drop"]["balanced_accuracy"]["value"])
        for c in report["conditions"]
        if c.get("drop") and c["drop"]["balanced_accuracy"]["value"] > SHIFT_TARGET
    ]
    if not missed:
        return ["", f"Every shift stays within the target (a drop of at most {SHIFT_TARGET})."]
    return [
        "",
        f"Over the target of {SHIFT_TARGET}: "
        + "; ".join(
            f"**{name}** by {drop - SHIFT_TARGET:.3f} (drop {drop:.3f}): {SHIFT_REASONS.get(name, 'not analysed')}"
            for name, drop in missed
        )
        + ".",
    ]


ENSEMBLE_INTRO = (
    "An ensemble (`lesionlab train --ensemble K`, or `lesionlab ensemble RUN…` on finished runs; see the "
    "README) is one model file holding K members trained with different seeds, recipes or backbones. Its "
    "probabilities are "
    "the members' calibrated probabilities averaged and recalibrated by one temperature fitted on the validation "
    "split; its run record holds the ensemble's test results beside each member's on the same images. On Diagnose "
    "an ensemble also says how many of its models agree on the top class and how far their P(melanoma) spreads "
    "(lowest to highest, standard deviation). These are an uncertainty signal, not a probability: members trained "
    "on the same data share their blind spots, so agreement does not make a result right, but disagreement is a "
    "reason to trust the number less."
)


def member_predictions(runs: Path, name: str, image_ids: np.ndarray) -> np.ndarray | None:
    """A member's calibrated test probabilities in the order of ``image_ids``, from its published run record."""
    run = runs / name
    if not has_evaluation(run):
        return None
    table, _, probs, _, _ = read_predictions(run)
    order = {str(i): k for k, i in enumerate(table["image_id"])}
    if not all(str(i) in order for i in image_ids):
        return None
    return probs[[order[str(i)] for i in image_ids]]


def augmentation_lines(runs: Path, ensembles: list[Path]) -> list[str]:
    """Members that differ only in their augmentation recipe, side by side on validation."""
    found: dict[tuple, dict[str, tuple[str, float]]] = {}
    for e in ensembles:
        for m in read_json(e / "evaluation.json")["members"]:
            if not (runs / m["run"] / "config.json").is_file():
                continue
            cfg = read_config(runs / m["run"])
            # Where a run kept its files is not part of what it learnt.
            ignored = ("augmentation", "name", "out", "data", "cache_dir", "decoded_dir")
            rest = tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in ignored))
            found.setdefault(rest, {})[cfg["augmentation"]] = (m["run"], m["val"]["balanced_accuracy"])
    pairs = [v for v in found.values() if len(v) > 1]
    if not pairs:
        return []
    said = [
        ", ".join(f"`{aug}` {val:.3f} (`{run}`)" for aug, (run, val) in sorted(p.items(), key=lambda kv: -kv[1][1]))
        for p in pairs
    ]
    lines = [
        "Augmentation recipes, otherwise the same run (validation balanced accuracy): " + "; ".join(said) + ". "
        "`wide` (random resized crops of 25–100 % of the area, any rotation, scale 0.5–1) is meant to survive the "
        "robustness report's scale and crop shifts. The bundled model keeps `strong` and no preset uses `wide` yet; "
        "Choosing the bundled model, below, judges each run by the rule that reads the drops as well."
    ]
    for pair in pairs:
        lines += shift_comparison(runs, sorted(pair.items(), key=lambda kv: -kv[1][1]))
    return lines


def shift_comparison(runs: Path, recipes: list[tuple[str, tuple[str, float]]]) -> list[str]:
    """The validation robustness reports (``--shifts --split val``) of runs that differ in their recipe."""
    reports = {aug: robustness.read_robustness(runs / run, "val") for aug, (run, _) in recipes}
    if any(r is None for r in reports.values()):
        return []
    first = next(iter(reports.values()))
    names = [c["name"] for c in first["conditions"] if c["name"] != "clean"]
    drop = {
        aug: {c["name"]: c["drop"]["balanced_accuracy"]["value"] for c in r["conditions"] if c.get("drop")}
        for aug, r in reports.items()
    }
    views = "with TTA" if first.get("tta") else "one view"
    return [
        "",
        f"Their balanced-accuracy drops under the robustness report's shifts, on the validation split ({views}; "
        "`lesionlab evaluate … --shifts --split val`):",
        "",
        "| recipe | " + " | ".join(names) + " | mean |",
        "| --- |" + " --- |" * (len(names) + 1),
        *(
            f"| `{aug}` | " + " | ".join(f"{d[n]:+.3f}" for n in names) + f" | {np.mean([d[n] for n in names]):+.3f} |"
            for aug, d in drop.items()
        ),
        "",
        "A smaller drop is bought with a lower clean score here: which matters more depends on the uploads. For "
        "images from other cameras, crops and scales the recipe with the smaller drops may be worth its lower score "
        "on our own images. One seed of each: more seeds should agree before a preset changes.",
    ]


def recipe(cfg: dict) -> str:
    """A run's training recipe in a few words."""
    chosen = "last epoch kept" if cfg.get("select_metric") == "last" else "best epoch on validation"
    extras = []
    if cfg.get("colour_constancy", "none") != "none":
        extras.append(f"`{cfg['colour_constancy']}`")
    if cfg.get("jpeg_quality"):
        extras.append(f"JPEG re-save at quality {cfg['jpeg_quality']}–100")
    return (
        f"{cfg['epochs']} epochs, {cfg['scheduler']} to lr {cfg['lr']:g}, label smoothing {cfg['label_smoothing']:g}, "
        + ", ".join([f"`{cfg['augmentation']}`", *extras, chosen])
    )


def recipe_lines(runs: Path) -> list[str]:
    """Full fine-tuning recipes side by side: every published run with a validation robustness report (one view),
    its clean scores and its drops under the shifts."""
    measured = []
    for run in sorted(runs.iterdir()):
        report = robustness.read_robustness(run, "val") if has_evaluation(run) else None
        cfg = read_config(run) if report is not None else None
        # An ensemble has no recipe of its own to show here: the Ensembles section and the choice table hold it.
        if report is None or report.get("tta") or cfg.get("arch") == "ensemble":
            continue
        drops = {c["name"]: c["drop"]["balanced_accuracy"]["value"] for c in report["conditions"] if c.get("drop")}
        clean = next(c for c in report["conditions"] if c["name"] == robustness.CLEAN)["balanced_accuracy"]
        measured.append((run, cfg, read_json(run / "evaluation.json"), clean, drops))
    if len(measured) < 2:
        return []
    lines = [
        "",
        "## Training recipes",
        "",
        "Full fine-tuning of the same backbone, trained differently. Validation: the robustness report's clean "
        "balanced accuracy and its drops under each of the six shifts (the kept epoch, one view, on the CPU; "
        "`lesionlab evaluate … --shifts --split val`). Test: the run's own record, calibrated, one view, "
        "computed where it trained (for the GPU runs in bf16, which moves a run's scores by up to 0.01 from the "
        "CPU evaluation in the Ensembles table).",
        "",
        "| run | recipe | val balanced acc. | test balanced acc. | test accuracy | mel AUC | ECE | mean drop | "
        "largest drop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, cfg, evaluation, clean, drops in measured:
        test = evaluation["test"]
        lines.append(
            f"| `{run.name}` | {recipe(cfg)} | {fmt(clean)} | {fmt(test['balanced_accuracy'])} | "
            f"{fmt(test['accuracy'])} | {fmt(test['roc_auc']['per_class']['mel'])} | {fmt(test['ece'])} | "
            f"{np.mean(list(drops.values())):+.3f} | {max(drops.values()):+.3f} |"
        )
    steadiest = min(measured, key=lambda m: np.mean(list(m[4].values())))
    best = max(measured, key=lambda m: m[3])
    lines += [
        "",
        f"Highest clean validation score: `{best[0].name}` ({best[3]:.3f}); smallest mean drop: "
        f"`{steadiest[0].name}` ({np.mean(list(steadiest[4].values())):+.3f}, its largest "
        f"{max(steadiest[4].values()):+.3f}). A run whose "
        "epoch was chosen on validation has an optimistic validation score there; one that keeps its last epoch "
        "does not, so part of a gap in that column is the choosing. Choosing the bundled model, below, judges each "
        "run by the rule fixed before issue 22's candidates, which reads these drops and the leave-one-source-out "
        "results besides the validation score.",
        *one_change_lines([(run, clean, drops) for run, _, _, clean, drops in measured]),
    ]
    return lines


def differing_fields(recipes: list[dict]) -> list[str]:
    """The fields on which any of ``recipes`` (:func:`core.evaluation.choice.recipe`) disagree, sorted."""
    return sorted({k for r in recipes for k in r if any(other.get(k) != r.get(k) for other in recipes)})


def one_change_lines(measured: list[tuple[Path, float, dict[str, float]]]) -> list[str]:
    """Pairs of runs (run, clean validation balanced accuracy, drop per shift) whose recipes differ in one field:
    what that one change did on validation. One seed of each, so a change of a few hundredths may be the seed's."""
    recipes = {run: choice_recipe(run, defaults=RECIPE_DEFAULTS) for run, _, _ in measured}
    found, starts = [], {}
    for (a, clean_a, drops_a), (b, clean_b, drops_b) in combinations(measured, 2):
        changed = differing_fields([recipes[a], recipes[b]])
        if len(changed) != 1:
            continue
        field = changed[0]
        values = (recipes[a].get(field), recipes[b].get(field))
        # One direction per setting: from the trainer's default when a run has it, else from the first value seen.
        start = starts.setdefault(
            field, RECIPE_DEFAULTS.get(field) if RECIPE_DEFAULTS.get(field) in values else values[0]
        )
        if values[1] == start:
            (a, clean_a, drops_a), (b, clean_b, drops_b) = (b, clean_b, drops_b), (a, clean_a, drops_a)
        shifts = ", ".join(f"{n} {drops_a[n]:+.3f} → {drops_b[n]:+.3f}" for n in drops_a if n in drops_b)
        found.append(
            f"- `{field}` {recipes[a].get(field)} → {recipes[b].get(field)} (`{a.name}` → `{b.name}`): clean "
            f"{clean_a:.3f} → {clean_b:.3f}; drops: {shifts}."
        )
    if not found:
        return []
    return [
        "",
        "One change at a time: runs whose recipes differ in one setting, on the same validation images (one seed "
        "each, so a change of a few hundredths may be the seed's):",
        "",
        *found,
    ]


def backbone_lines() -> list[str]:
    """The frozen-feature screen of the offline backbones (``bench/backbones.py``, docs/BENCHMARKS.json): what
    each one's features carry at home and away from home, before any is fine-tuned; nothing when it has not run."""
    screen = (read_json(BENCHMARKS_JSON) if BENCHMARKS_JSON.is_file() else {}).get("backbones")
    if not screen:
        return []
    sources = screen["sources"]
    lines = [
        "",
        "## Backbones screened with frozen features",
        "",
        "Before a backbone is fine-tuned (hours per run and per held-out source on the CPU), its frozen ImageNet "
        "features are screened: an MLP head trained on them by the trainer (`--finetune head`), at home and with "
        "each source that can be held out left out and tested on (`python -m bench.backbones`, docs/BENCHMARKS.md). "
        "Balanced accuracy; these rank what the features carry, far below what fine-tuning reaches.",
        "",
        "| backbone | home: validation | home: test | "
        + " | ".join(f"without {s}: on {s}" for s in sources)
        + " | held-out mean |",
        "| --- | --- | --- | " + " | ".join("---" for _ in sources) + " | --- |",
    ]
    for r in screen["rows"]:
        held = " | ".join(fmt(r["holdout"].get(s)) for s in sources)
        lines.append(f"| `{r['arch']}` | {fmt(r['val'])} | {fmt(r['test'])} | {held} | {fmt(r['holdout_mean'])} |")
    return lines


def did_not_help_lines(runs: Path, reference: Path) -> list[str]:
    """What was tried and not adopted, each with the validation number that decided it (the sections above
    hold the details)."""
    ref_val = read_json(reference / "evaluation.json")["val"]["balanced_accuracy"]
    said = []
    ensembles = [d for d in sorted(runs.iterdir()) if has_evaluation(d) and read_config(d).get("arch") == "ensemble"]
    if ensembles:
        vals = {d.name: read_json(d / "evaluation.json")["val"]["balanced_accuracy"] for d in ensembles}
        said.append(
            "**Ensembles**: validation balanced accuracy "
            + ", ".join(f"{v:.3f} (`{name}`)" for name, v in vals.items())
            + f" against the bundled single network's {ref_val:.3f} (each beside its own members under Ensembles)."
        )
    tta = (read_json(BENCHMARKS_JSON) if BENCHMARKS_JSON.is_file() else {}).get("tta", {}).get("accuracy", {})
    zooms = {k: v for k, v in tta.get("val", {}).items() if "zoom" in k}
    if zooms:
        said.append(
            "**Zoomed views in test-time augmentation**: validation balanced accuracy "
            + ", ".join(f"{v['balanced_accuracy']:.3f} ({k})" for k, v in zooms.items())
            + f" against {tta['val']['flips']['balanced_accuracy']:.3f} for the four flips alone, which Diagnose "
            "and evaluation use (`bench/tta.py`, docs/BENCHMARKS.md)."
        )
    fine_tuned = (read_json(METADATA_RESULTS) if METADATA_RESULTS.is_file() else {}).get("fine_tuned")
    if fine_tuned:
        d = fine_tuned["val"]["difference_with_vs_image_only"]
        said.append(
            f"**Age, sex and body site** as inputs of the fine-tuned network: validation balanced accuracy "
            f"{d['difference']:+.3f} (paired 95% interval {d['interval'][0]:+.3f} to {d['interval'][1]:+.3f}) "
            "(Metadata)."
        )
    for run in sorted(runs.iterdir()):
        report = robustness.read_robustness(run, "val") if has_evaluation(run) else None
        cfg = read_config(run) if report else {}
        if report and cfg.get("augmentation") == "wide":
            clean = next(c for c in report["conditions"] if c["name"] == robustness.CLEAN)["balanced_accuracy"]
            said.append(
                f"**The `wide` augmentation** (`{run.name}`): clean validation balanced accuracy {clean:.3f}; it "
                "shrinks the drops under the scale and crop shifts but costs clean score (Training recipes)."
            )
    if not said:
        return []
    return ["", "## What did not help", "", *(f"- {line}" for line in said)]


# The device a run's start event names, in words.
TRAINED_ON = {"cuda": "a GPU", "cpu": "the 2-core CPU"}


def trained_device(run: RunState) -> str:
    """The device a run trained on, from its start event ("?" when it has none)."""
    return (run.start or {}).get("device", "?")


def ensemble_cost_lines(runs: Path, ensembles: list[Path]) -> list[str]:
    """Where and how long each member trained, and what an answer costs (bench/diagnose_cost.py)."""
    names = sorted({m["run"] for e in ensembles for m in read_config(e)["members"]})
    trained = []
    for name in names:
        if (runs / name / "metrics.jsonl").is_file():
            run = read_run(runs / name)
            device = trained_device(run)
            trained.append(f"`{name}` {run.wall_time_s / 60:.1f} min on {TRAINED_ON.get(device, device)}")
    line = "Training: " + "; ".join(trained) + " (each run's start to its end, from its metrics.jsonl)."
    costs = read_json(BENCHMARKS_JSON).get("diagnose_cost") if BENCHMARKS_JSON.is_file() else None
    if costs:
        shown = "; ".join(
            f"{r['members']} network{'s' * (r['members'] > 1)} ({r['megabytes']:.1f} MB): "
            + " / ".join(f"{c['p50_ms']:.0f} ms" for c in r["cost"].values())
            for r in costs["models"]
        )
        line += (
            f" A Diagnose answer, one view / default TTA, p50 on the 2-core CPU ({costs['date'][:10]}, "
            f"bench/diagnose_cost.py): {shown}."
        )
    return [line]


def ensemble_lines(runs: Path, reference: Path) -> list[str]:
    """The Ensembles section: each published ensemble run in ``runs`` beside its members, chosen on validation."""
    ensembles = [d for d in sorted(runs.iterdir()) if has_evaluation(d) and read_config(d).get("arch") == "ensemble"]
    lines = ["", "## Ensembles", "", ENSEMBLE_INTRO]
    if not ensembles:
        return [*lines[:-1], ENSEMBLE_INTRO + " The reference model above is a single network; no ensemble has been "
                "measured for this card yet."]  # fmt: skip
    lines += [
        "",
        "Measured ensembles of the published runs (`lesionlab ensemble … --data ../shared/data/ham10000-200x150`"
        "). Validation balanced accuracy is what a choice may look at; each member's is optimistic, since its best "
        "epoch was chosen on it. Test: calibrated probabilities, one view (no TTA), balanced accuracy and ECE with "
        "their 95% bootstrap intervals, and the paired interval of the difference from the reference model on the "
        "same images (1000 resamples each).",
        "",
        "| model | val balanced acc. | test accuracy | test balanced acc. | vs reference (95% CI) | mel AUC | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rerun = set()  # members whose run record and the ensemble's own evaluation of them differ
    for ens in ensembles:
        evaluation = read_json(ens / "evaluation.json")
        table, labels, probs, _, _ = read_predictions(ens)
        ids = table["image_id"].to_numpy()
        ref = member_predictions(reference.parent, reference.name, ids)
        rows = [
            (f"**{ens.name}** ({len(evaluation['members'])} members)", evaluation["val"], evaluation["test"], probs)
        ]
        rows += [
            (f"member `{m['run']}`", m["val"], m["test"], member_predictions(runs, m["run"], ids))
            for m in evaluation["members"]
        ]
        ref_balanced = None if ref is None else balanced_accuracy(labels, ref)
        for title, val, test, member_probs in rows:
            known = member_probs is not None
            # A row's numbers all come from one set of probabilities: the run's own record where it is published.
            shown = compute_metrics(labels, member_probs) if known else test
            gain = ""
            if ref is not None and known and not np.allclose(member_probs, ref):
                low, high = paired_bootstrap_ci(labels, member_probs, ref, balanced_accuracy)
                gain = f"{shown['balanced_accuracy'] - ref_balanced:+.3f} ({low:+.3f} to {high:+.3f})"
            lines.append(
                f"| {title} | {fmt(val['balanced_accuracy'])} | {fmt(shown['accuracy'])} | "
                + (interval(labels, member_probs, balanced_accuracy) if known else fmt(test["balanced_accuracy"]))
                + f" | {gain} | {fmt(shown['roc_auc']['per_class']['mel'])} | "
                + (interval(labels, member_probs, expected_calibration_error) if known else fmt(test["ece"]))
                + " |"
            )
            if known and abs(shown["balanced_accuracy"] - test["balanced_accuracy"]) > 0.001:
                rerun.add((title, test["balanced_accuracy"], shown["balanced_accuracy"]))
    if rerun:
        lines += [
            "",
            "Member rows are each run's own record. Runs trained on a GPU were evaluated there (bf16 autocast, "
            "images from the decoded-image cache); the ensemble evaluates its members again in float32 on the CPU "
            "from the JPEG files, which moves their test balanced accuracy: "
            + "; ".join(f"{title} {own:.3f} → {again:.3f}" for title, again, own in sorted(rerun))
            + " (the ensembles combine the float32 answers).",
        ]
    lines += ["", members_line(runs, ensembles)]
    lines += ["", *augmentation_lines(runs, ensembles), "", *ensemble_cost_lines(runs, ensembles)]
    best = max(ensembles, key=lambda d: read_json(d / "evaluation.json")["val"]["balanced_accuracy"])
    best_val = read_json(best / "evaluation.json")["val"]["balanced_accuracy"]
    ref_val = read_json(ensembles[0] / "evaluation.json")["members"]
    ref_val = next((m["val"]["balanced_accuracy"] for m in ref_val if m["run"] == reference.name), None)
    if ref_val is not None:
        verdict = (
            f"On validation the best ensemble, `{best.name}`, reaches {best_val:.3f} balanced accuracy against the "
            f"reference model's {ref_val:.3f}"
        )
        lines += [
            "",
            verdict
            + (
                ": the bundled model stays the single network (chosen on validation, not on the test split), "
                "and it answers Diagnose at the cost of one network, not two or three."
                if best_val <= ref_val
                else ": the ensemble is the better choice on validation."
            ),
            "",
            calibration_line(ensembles, reference),
        ]
    return lines


def members_line(runs: Path, ensembles: list[Path]) -> str:
    """What each published ensemble's members differ in: recipe (:func:`core.evaluation.choice.recipe`), seed and
    the device that trained them (from their run configs and metrics.jsonl)."""
    described = []
    for ensemble in ensembles:
        names = [m["run"] for m in read_config(ensemble)["members"]]
        recipes = [choice_recipe(runs / n, defaults=RECIPE_DEFAULTS) for n in names]
        seeds = sorted({read_config(runs / n).get("seed") for n in names})
        devices = sorted({trained_device(read_run(runs / n)) for n in names})
        differ = differing_fields(recipes)
        what = [f"recipes that differ in {', '.join(f'`{k}`' for k in differ)}" if differ else "one recipe"]
        what.append(f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(str(x) for x in seeds)}")
        what.append("trained on " + " and ".join(TRAINED_ON.get(d, d) for d in devices))
        described.append(f"`{ensemble.name}`: " + ", ".join(what))
    return (
        "Their members: "
        + "; ".join(described)
        + ". `lesionlab train --ensemble K` trains K seeds of one recipe, in K times a member's training time."
    )


def calibration_line(ensembles: list[Path], reference: Path) -> str:
    """What the ensembles did improve on validation, beside the balanced accuracy the choice read."""
    ref = read_json(reference / "evaluation.json")["val"]
    evaluations = {d: read_json(d / "evaluation.json") for d in ensembles}
    best = min(ensembles, key=lambda d: evaluations[d]["val"]["ece"])
    val = evaluations[best]["val"]
    mel = lambda m: m["roc_auc"]["per_class"]["mel"]  # noqa: E731
    return (
        f"Balanced accuracy is not all an ensemble changes: on validation `{best.name}` lowers the calibration error "
        f"from {ref['ece']:.3f} to {val['ece']:.3f}, and moves accuracy from {ref['accuracy']:.3f} to "
        f"{val['accuracy']:.3f} and melanoma AUC from {mel(ref):.3f} to {mel(val):.3f}, at "
        f"{len(evaluations[best]['members'])} times the cost of an answer. The choice rule "
        "(Choosing the bundled model) reads validation balanced accuracy, the held-out sources and the shifts, not "
        "calibration; a deployment that needs calibrated probabilities more "
        "than the last point of balanced accuracy would choose the ensemble (`lesionlab ensemble` writes its "
        "file; Diagnose, Evaluate and Compare take it like any run)."
    )


def metadata_lines(r: dict | None = None) -> list[str]:
    """The model card's "Metadata" section from ``bench/metadata.py``'s results (``r``, else its full-dataset
    run recorded in docs/metadata-results.json; nothing when it has not run)."""
    if r is None:
        r = read_json(METADATA_RESULTS) if METADATA_RESULTS.is_file() else None
        if not r or not r.get("full_dataset"):
            return []
    recipe, test, n = r["recipe"], r["test"], r["test_images"]
    known = ", ".join(f"{field} {count}" for field, count in r["known"].items())
    rows = [
        ("image only", "image", test["image only"]),
        (f"with metadata (p = {r['chosen_withhold']:g})", "image + age, sex, site", test["metadata, with"]),
        (f"with metadata (p = {r['chosen_withhold']:g})", "image, metadata withheld", test["metadata, withheld"]),
    ]
    lines = [
        "",
        "## Metadata (age, sex, body site)",
        "",
        f"A {recipe['arch']} head on cached ImageNet features ({recipe['input_size'][0]}×{recipe['input_size'][1]}, "
        f"`{recipe['imbalance']}` loss with power {recipe['class_weight_power']:g}, {recipe['epochs']} epochs) "
        "trained on the image alone and, otherwise the same, with metadata (`--metadata`: an embedding of the "
        "encoded age, sex and site concatenated to the pooled features; during training each field withheld "
        f"with probability p). p was chosen on the validation split among "
        f"{', '.join(t.split('= ')[1] for t in r['val'] if t != 'image only')} (validation balanced accuracy "
        + ", ".join(f"{t}: {fmt(v['balanced_accuracy'])}" for t, v in r["val"].items())
        + f"). Test split, {n} images (metadata known: {known}):",
        "",
        "| model | inputs | accuracy | balanced acc. (95% interval) | mel AUC | macro AUC | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for title, inputs, m in rows:
        low, high = m["intervals"]["balanced_accuracy"]
        lines.append(
            f"| {title} | {inputs} | {fmt(m['accuracy'])} | {fmt(m['balanced_accuracy'])} ({fmt(low)}–{fmt(high)}) "
            f"| {fmt(m['mel_auc'])} | {fmt(m['macro_auc'])} | {fmt(m['ece'])} |"
        )
    with_m, withheld = r["difference_with_vs_image_only"], r["difference_withheld_vs_image_only"]

    def verdict(d: dict) -> str:
        low, high = d["interval"]
        word = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
        return f"{d['difference']:+.3f} (paired 95% interval {low:+.3f} to {high:+.3f}: {word})"

    lines += [
        "",
        f"Balanced accuracy against the image-only model: with metadata {verdict(with_m)}; with it withheld "
        f"{verdict(withheld)}. These are head-only models. Measured by `python -m bench.metadata` on {r['date']}.",
    ]
    return lines + fine_tuned_metadata_lines(r.get("fine_tuned"), verdict)


def fine_tuned_metadata_lines(f: dict | None, verdict: Callable[[dict], str]) -> list[str]:
    """The reference recipe fine-tuned with metadata against the bundled image-only model (``bench/metadata.py
    --fine-tuned``), and whether the reference model takes metadata."""
    if f is None:
        return [
            "",
            "The reference model takes the image only: no fine-tuned model with metadata has been measured.",
        ]
    lines = [
        "",
        "### The reference recipe with metadata",
        "",
        f"The reference recipe (full fine-tuning, the command above) trained once more with `--metadata` (each "
        f"field withheld with p = {f['withhold']:g}; run `{f['run']}`, through the decoded-image cache), against "
        f"the bundled image-only model `{f['image_only']}` of the same recipe and seed, on the same images "
        "(calibrated, one view). The choice is made on the validation split, by a rule fixed before the run: "
        "take metadata only if the paired 95% interval of the balanced-accuracy gain lies above zero.",
        "",
        "| split | model | inputs | accuracy | balanced acc. (95% interval) | mel AUC | macro AUC | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        ("image only", "image"),
        ("metadata, with", "image + age, sex, site"),
        ("metadata, withheld", "image, metadata withheld"),
    ]
    for split in ("val", "test"):
        for key, inputs in rows:
            m = f[split][key]
            low, high = m["intervals"]["balanced_accuracy"]
            model = "image only" if key == "image only" else "with metadata"
            lines.append(
                f"| {split} ({f[split]['images']}) | {model} | {inputs} | {fmt(m['accuracy'])} | "
                f"{fmt(m['balanced_accuracy'])} ({fmt(low)}–{fmt(high)}) | {fmt(m['mel_auc'])} | "
                f"{fmt(m['macro_auc'])} | {fmt(m['ece'])} |"
            )
    val, test = f["val"], f["test"]
    decision = (
        "The validation gain clears the rule, so metadata is worth adopting."
        if f["adopt"]
        else "The validation gain does not clear the rule, so the bundled reference model stays image-only."
    )
    low, high = val["difference_with_vs_withheld"]["interval"]
    if high - low < 0.02 and low <= 0 <= high:
        # Why no gain: the network barely reads its metadata (the head-only model above did read it).
        decision = (
            "With and without its own metadata the fine-tuned network scores within a hundredth: trained end to "
            "end, it learnt to lean on the image and all but ignore the small metadata embedding beside its "
            "image features. " + decision
        )
    lines += [
        "",
        f"Balanced accuracy, with metadata against the image-only model: validation "
        f"{verdict(val['difference_with_vs_image_only'])}; test {verdict(test['difference_with_vs_image_only'])}. "
        f"The same metadata model with and without its metadata: validation "
        f"{verdict(val['difference_with_vs_withheld'])}; test {verdict(test['difference_with_vs_withheld'])}. "
        f"{decision} Measured by `python -m bench.metadata --fine-tuned` on {f['date']}.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-200x150"))
    p.add_argument("--reference", type=Path, required=True, help="the reference model's run folder")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where comparison runs live")
    p.add_argument("--train", action="store_true", help="train missing comparison runs first")
    p.add_argument(
        "--command",
        default=REFERENCE_COMMAND,
    )
    p.add_argument("--out", type=Path, default=ROOT / "MODEL_CARD.md")
    args = p.parse_args()
    if args.train:
        train_comparisons(args.data, args.runs)
    args.out.write_text(
        card(
            args.reference.resolve(),
            comparison_runs(args.data, args.runs),
            args.command,
            args.runs.resolve(),
            args.data,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
