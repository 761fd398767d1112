"""The decoded-image cache reused by evaluation and by the feature extraction of head-only training: the same
numbers as decoding the JPEG files, within resampling error, and the files again where the cache cannot serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.decoded import open_decoded
from core.data.images import ImageError
from core.data.preprocessing import Preprocessing
from core.evaluation.evaluate import evaluate_checkpoint, index_data
from core.inference.features import compute_features
from core.inference.opening import open_predictor
from core.models.checkpoints import read_checkpoint
from core.training.loop import train
from tests.conftest import ROOT, write_truncated_jpeg
from tests.core.data.test_decoded import images_of, run_events, sample_copy, sample_run  # noqa: F401 — sample_copy: a fixture

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
# The reference model's images are its input size already: the cache's pixels reach the model exactly as the
# files' do (the reports round probabilities to 1e-6). Resized (224×224 from 200×150), torchvision's 8-bit resize
# and PIL's differ by 1/255 on one value in 4,000: measured, probabilities then differ by at most 0.002 and
# features by 7e-4 of their largest value.
EXACT = 1e-5
RESIZED = 0.01


def resized_checkpoint(tmp_path) -> str:
    """The reference model asking for 224×224 inputs and no source size: every image is resized on its way in."""
    ckpt = read_checkpoint(REFERENCE)
    ckpt["preprocessing"] = Preprocessing(input_size=(224, 224)).to_dict()
    path = tmp_path / "resized.pt"
    torch.save(ckpt, path)
    return str(path)


def probabilities(result: dict) -> np.ndarray:
    return np.array([list(p["probabilities"].values()) for p in result["predictions"]])


@pytest.mark.parametrize("resized", [False, True], ids=["native-size", "resized"])
def test_evaluation_reads_the_cache_training_built_and_matches_the_files(tmp_path, resized):
    checkpoint = resized_checkpoint(tmp_path) if resized else str(REFERENCE)
    # One view: the cache and the files must give the model the same pixels; the flips would only repeat them.
    options = {"split": "all", "bootstrap": 0, "tta": False}
    files = evaluate_checkpoint(checkpoint, SAMPLE, decoded_dir=tmp_path / "decoded", **options)
    assert files["input_pipeline"] == "jpeg"  # nothing built yet, and evaluation does not build it
    assert "holds no current decoded-image cache" in files["input_pipeline_note"]
    assert not (tmp_path / "decoded").exists()

    prep = open_predictor(checkpoint).prep
    open_decoded(index_data(SAMPLE).frame["path"].tolist(), prep, root=SAMPLE, cache_dir=tmp_path / "decoded")
    cached = evaluate_checkpoint(checkpoint, SAMPLE, decoded_dir=tmp_path / "decoded", **options)

    assert cached["input_pipeline"] == "decoded" and cached["input_pipeline_note"] is None
    assert [p["path"] for p in cached["predictions"]] == [p["path"] for p in files["predictions"]]
    difference = np.abs(probabilities(cached) - probabilities(files)).max()
    assert difference <= (RESIZED if resized else EXACT), difference
    assert cached["metrics"]["accuracy"] == pytest.approx(files["metrics"]["accuracy"], abs=1 / 140 + 1e-9)


def test_a_split_with_an_image_the_cache_found_damaged_is_read_from_the_files(sample_copy, tmp_path):  # noqa: F811
    paths = images_of(sample_copy)
    write_truncated_jpeg(paths[4])
    prep = open_predictor(REFERENCE).prep
    open_decoded(index_data(sample_copy).frame["path"].tolist(), prep, root=sample_copy, cache_dir=tmp_path / "d")
    with pytest.raises(ImageError, match="damaged or truncated"):  # the files say which image and why
        evaluate_checkpoint(REFERENCE, sample_copy, split="all", bootstrap=0, decoded_dir=tmp_path / "d")


def test_features_from_the_cache_match_the_files_and_leave_damaged_images_out(sample_copy, tmp_path):  # noqa: F811
    paths = images_of(sample_copy)
    write_truncated_jpeg(paths[4])
    backbone = open_predictor(REFERENCE).model.backbone
    prep = Preprocessing(input_size=(224, 224))  # resized on the way in, as the seed preset's images are
    cache = open_decoded(paths, prep, root=sample_copy, cache_dir=tmp_path / "decoded")
    device = torch.device("cpu")

    files, damaged = compute_features(backbone, paths, prep, device=device, batch_size=8)
    cached, cache_damaged = compute_features(backbone, paths, prep, device=device, batch_size=8, decoded=cache)

    assert damaged == cache_damaged == [paths[4]]
    assert cached.shape == files.shape == (len(paths) - 1, files.shape[1])
    scale = files.abs().max().item()
    assert (cached - files).abs().max().item() <= RESIZED * scale

    # A stop after the first batch keeps what it covered: eight images and the damaged one among them.
    calls = []
    part, part_damaged = compute_features(
        backbone,
        paths,
        prep,
        device=device,
        batch_size=8,
        decoded=cache,
        progress=lambda done, total: calls.append((done, total)),
        should_stop=lambda: True,
    )
    assert calls == [(9, len(paths))] and part_damaged == [paths[4]]
    assert torch.equal(part, cached[:8])


def test_head_only_training_computes_its_features_from_the_cache(tmp_path):
    cfg = sample_run(
        tmp_path, "seed", name="head", arch="mobilenet_v2", input_size=(32, 32), epochs=1, cache_dir=str(tmp_path / "f")
    )
    assert cfg.uses_feature_cache and cfg.input_pipeline == "decoded"
    events = run_events(train(cfg))
    phases = [e["phase"] for e in events if "phase" in e]
    assert phases.index("decoding") < phases.index("features")  # decoded once, then the backbone reads it
    decoding = [e for e in events if e.get("phase") == "decoding"]
    assert decoding[-1]["done"] == decoding[-1]["total"] == 140
    assert len(list((tmp_path / "decoded").glob("*/images.npy"))) == 1
    assert events[-1]["event"] == "end" and events[-1]["status"] == "finished"
