"""Does age, sex and body site help? The same head-only MobileNetV2 on cached ImageNet features, trained on the
image alone and with metadata (one run per withholding probability); the metadata run is chosen on the
validation split and reported on the test split with its metadata, with every field withheld, and beside the
image-only run (a paired bootstrap of the balanced-accuracy difference).

    python -m bench.metadata [--data ../shared/data/ham10000-200x150] [--max-images N] [--epochs 15]
    python -m bench.metadata --fine-tuned runs/reference-meta [--image-only checkpoints/reference.pt]

The second form compares the reference recipe fine-tuned with metadata (``lesionlab train --preset
reference --metadata``) with the bundled image-only model of the same recipe, on the validation split (where
the choice is made) and the test split, each image once with its metadata and once with every field withheld;
it adds its results to the file under "fine_tuned".

Writes ``docs/metadata-results.json`` (not in docs/runs: it is no run), which ``bench/model_card.py`` turns into
the model card's "Metadata" section (rewritten here after a full-dataset run). Not a speed benchmark: the numbers do
not depend on the machine's load. The runs train in ``--out`` (default ``runs/``) and are reused when complete.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from bench.benchmarks import DEFAULT_DATA, machine
from bench.model_card import REFERENCE_COMMAND, card, comparison_runs, metadata_lines
from core.common.files import read_json, write_json
from core.common.labels import CLASSES
from core.common.runs import has_evaluation, read_config, read_split
from core.data.dataset import index_dataset
from core.evaluation.evaluate import evaluate_checkpoint
from core.inference.features import FeatureCache, backbone_key
from core.metrics.bootstrap import confidence_intervals
from core.metrics.calibration import softmax
from core.metrics.classification import compute_metrics
from core.models.checkpoints import load_model
from core.training.config import TrainConfig, config_with
from core.training.loaders import SharedInputs
from core.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ROOT / "docs" / "metadata-results.json"
WITHHOLD = (0.1, 0.3, 0.5)


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    """The image-only run and one metadata run per withholding probability, otherwise the same."""
    base = dict(
        data=str(args.data),
        out=str(args.out),
        arch="mobilenet_v2",
        finetune="head",
        head="mlp",
        input_size=(150, 200),
        source_size=(200, 150),
        imbalance="weighted_loss",
        class_weight_power=0.5,
        epochs=args.epochs,
        batch_size=32,
        optimizer="adam",
        lr=1e-3,
        scheduler="cosine",
        max_images=args.max_images or None,
        cache_dir=str(args.cache_dir),
    )
    runs = {"image only": config_with("seed", name="metadata-none", **base)}
    for p in WITHHOLD:
        runs[f"metadata, p = {p:g}"] = config_with(
            "seed", name=f"metadata-p{p:g}", metadata=True, metadata_dropout=p, **base
        )
    return runs


def headline(labels: np.ndarray, probs: np.ndarray, intervals: bool = False) -> dict:
    m = compute_metrics(labels, probs)
    mel = m["melanoma"]
    out = {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "mel_auc": m["roc_auc"]["per_class"]["mel"],
        "macro_auc": m["roc_auc"]["macro"],
        "ece": m["ece"],
        "mel_sensitivity": mel["sensitivity"],
        "mel_specificity": mel["specificity"],
    }
    if intervals:
        out["intervals"] = confidence_intervals(labels, probs, n=1000)
    return out


@torch.inference_mode()
def split_probs(run_dir: Path) -> dict:
    """Per split (val, test): labels and calibrated probabilities with the images' metadata ("with") and with
    every field withheld ("withheld"; the same as "with" for an image-only model), from the cached features;
    under "known", how many test images know each field (for a metadata model)."""
    cfg = TrainConfig.from_dict(read_config(run_dir))
    model, ckpt = load_model(run_dir / "best.pt")
    frame = index_dataset(cfg.data).frame
    split = read_split(run_dir).set_index("image_id")["split"]
    frame = frame[frame["image_id"].isin(split.index)].assign(split=lambda f: f["image_id"].map(split).to_numpy())
    out = {}
    for name in ("val", "test"):
        rows = frame[frame["split"] == name]
        key = backbone_key(cfg.arch, cfg.weights, cfg.preprocessing)
        feats, damaged = FeatureCache(cfg.cache_dir).features(
            model.backbone, key, rows["path"].tolist(), cfg.preprocessing, device=torch.device("cpu")
        )
        rows = rows[~rows["path"].isin(damaged)]
        labels = rows["label"].to_numpy()
        encoding = model.metadata_encoding
        variants = {"with": None, "withheld": None}
        if encoding is not None:
            encoded = encoding.encode_frame(rows)
            variants["with"] = model.head.join(feats, encoded)
            variants["withheld"] = model.head.join(feats)
            out["known"] = encoding.known(encoded)
        out[name] = {
            variant: (
                labels,
                softmax(model.head(feats if joined is None else joined).numpy(), ckpt["temperature"]),
            )
            for variant, joined in variants.items()
        }
    return out


def paired_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 2000) -> dict:
    """Balanced accuracy of ``a`` minus that of ``b`` (probabilities for the same images) with a paired 95%
    bootstrap interval: the same resampled images score both."""
    rng = np.random.default_rng(0)
    pred_a, pred_b = a.argmax(1), b.argmax(1)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[i])) < len(np.unique(labels)):
            continue
        diffs.append(balanced_accuracy_score(labels[i], pred_a[i]) - balanced_accuracy_score(labels[i], pred_b[i]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "difference": balanced_accuracy_score(labels, pred_a) - balanced_accuracy_score(labels, pred_b),
        "interval": [float(low), float(high)],
    }


def measure(args: argparse.Namespace) -> dict:
    shared = SharedInputs()
    runs = configs(args)
    for cfg in runs.values():
        run_dir = Path(cfg.out) / cfg.name
        if not has_evaluation(run_dir):
            print(f"training {cfg.name}", flush=True)
            train(cfg, run_dir=run_dir, resume=(run_dir / "last.pt").is_file(), shared=shared)
    probs = {title: split_probs(Path(cfg.out) / cfg.name) for title, cfg in runs.items()}
    val = {title: headline(*p["val"]["with"]) for title, p in probs.items()}
    chosen = max((t for t in runs if t != "image only"), key=lambda t: val[t]["balanced_accuracy"])
    test = {
        "image only": headline(*probs["image only"]["test"]["with"], intervals=True),
        "metadata, with": headline(*probs[chosen]["test"]["with"], intervals=True),
        "metadata, withheld": headline(*probs[chosen]["test"]["withheld"], intervals=True),
    }
    labels = probs["image only"]["test"]["with"][0]
    assert np.array_equal(labels, probs[chosen]["test"]["with"][0])  # the same test images, in the same order
    base = runs["image only"]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "data": Path(base.data).name,
        "full_dataset": not args.max_images,
        "recipe": {k: base.to_dict()[k] for k in ("arch", "input_size", "imbalance", "class_weight_power", "epochs")},
        "runs": {title: cfg.name for title, cfg in runs.items()},
        "val": val,
        "chosen": chosen,
        "chosen_withhold": runs[chosen].metadata_dropout,
        "test": test,
        "test_images": int(len(labels)),
        "known": probs[chosen]["known"],
        "difference_with_vs_image_only": paired_difference(
            labels, probs[chosen]["test"]["with"][1], probs["image only"]["test"]["with"][1]
        ),
        "difference_withheld_vs_image_only": paired_difference(
            labels, probs[chosen]["test"]["withheld"][1], probs["image only"]["test"]["with"][1]
        ),
        "classes": list(CLASSES),
    }


def evaluated_probs(checkpoint: Path, data: Path, split: str) -> dict[str, np.ndarray]:
    """Image ids, labels and calibrated probabilities (one view) of ``checkpoint`` on ``split`` of its own
    lesion-grouped split; for a model that takes metadata also with every field withheld ("withheld")."""
    rows = evaluate_checkpoint(checkpoint, data, split=split, tta=False, bootstrap=0)["predictions"]
    table = lambda key: np.array([[r[key][c] for c in CLASSES] for r in rows])  # noqa: E731
    out = {
        "ids": np.array([r["image_id"] for r in rows]),
        "labels": np.array([CLASSES.index(r["true"]) for r in rows]),
        "with": table("probabilities"),
    }
    if "probabilities_withheld" in rows[0]:
        out["withheld"] = table("probabilities_withheld")
    return out


def measure_fine_tuned(run_dir: Path, image_only: Path, data: Path) -> dict:
    """The metadata model fine-tuned with the reference recipe against the image-only model of that recipe, on
    the same images of the validation and test splits; "adopt" is the rule fixed before looking: the
    validation split's paired interval of the balanced-accuracy difference lies above zero."""
    results: dict = {
        "run": run_dir.name,
        "image_only": image_only.name,
        "withhold": read_config(run_dir)["metadata_dropout"],
    }
    for split in ("val", "test"):
        meta = evaluated_probs(run_dir / "best.pt", data, split)
        plain = evaluated_probs(image_only, data, split)
        assert np.array_equal(meta["ids"], plain["ids"])  # the same images, in the same order
        labels = meta["labels"]
        results[split] = {
            "images": int(len(labels)),
            "image only": headline(labels, plain["with"], intervals=True),
            "metadata, with": headline(labels, meta["with"], intervals=True),
            "metadata, withheld": headline(labels, meta["withheld"], intervals=True),
            "difference_with_vs_image_only": paired_difference(labels, meta["with"], plain["with"]),
            "difference_withheld_vs_image_only": paired_difference(labels, meta["withheld"], plain["with"]),
            "difference_with_vs_withheld": paired_difference(labels, meta["with"], meta["withheld"]),
        }
    results["adopt"] = results["val"]["difference_with_vs_image_only"]["interval"][0] > 0
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def write_card() -> None:
    reference = ROOT / "docs" / "runs" / "reference-mnv2"
    (ROOT / "MODEL_CARD.md").write_text(
        card(reference, comparison_runs("", ROOT / "docs" / "runs"), REFERENCE_COMMAND, ROOT / "docs" / "runs")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs", help="where the runs train")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "features")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--max-images", type=int, default=0, help="a quick proof on a stratified subsample")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--fine-tuned", type=Path, help="a run of the reference recipe with --metadata (see above)")
    p.add_argument("--image-only", type=Path, default=ROOT / "checkpoints" / "reference.pt")
    args = p.parse_args()
    if args.fine_tuned:
        results = read_json(args.results)
        results["fine_tuned"] = measure_fine_tuned(args.fine_tuned, args.image_only, args.data)
        write_json(args.results, results)
        print("\n".join(metadata_lines(results)))
        if args.results == RESULTS:
            write_card()
        return
    results = measure(args)
    previous = read_json(args.results) if args.results.is_file() else {}
    if "fine_tuned" in previous:  # measured by the --fine-tuned form, which this one does not repeat
        results["fine_tuned"] = previous["fine_tuned"]
    write_json(args.results, results)
    print("\n".join(metadata_lines(results)))
    if results["full_dataset"] and args.results == RESULTS:
        write_card()


if __name__ == "__main__":
    main()
