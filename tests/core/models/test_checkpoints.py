"""Checkpoints from careless or hostile hands: every field is checked before anything is built, each refusal
names the field and what is allowed, both command lines answer with one ``error:`` line and exit status 2,
a pickle that would run code is not run, and broken weights never become a prediction."""

from __future__ import annotations

import functools
import io
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import evaluate as evaluate_cli
from core.cli import predict as predict_cli
from core.common.labels import CLASSES
from core.data.preprocessing import MAX_INPUT_SIDE, MIN_INPUT_SIDE, Preprocessing
from core.evaluation import evaluate as evaluation_evaluate
from core.inference import forward
from core.inference.forward import PredictionError, view_count
from core.inference.opening import open_predictor
from core.models.architectures import build_model
from core.models.checkpoints import (
    FORMAT,
    MAX_CHECKPOINT_BYTES,
    CheckpointError,
    atomic_save,
    checkpoint_dict,
    load_model,
    read_checkpoint,
)
from core.training.config import TrainConfig
from tests.conftest import make_image, no_printed_warnings, run_cli

PREP = Preprocessing(input_size=(48, 48))

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsACommand:
    """Pickles as a call to ``os.system``: what a malicious "checkpoint" carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@functools.cache
def real_weights() -> dict:
    """A complete MobileNetV2 state (9 MB), for files whose other fields must all work, like those that
    crashed the command lines or gave wrong numbers before the fields were checked."""
    torch.manual_seed(0)
    return build_model("mobilenet_v2", weights="none", finetune="head", head="linear").state_dict()


def valid_fields(weights: bool = False) -> dict:
    """Every field a checkpoint carries, all within bounds; unless ``weights``, the weights are a small
    stand-in (the field checks come before any model is built)."""
    state = real_weights() if weights else {"head.1.bias": torch.zeros(7)}
    return {
        "format": FORMAT,
        "arch": "mobilenet_v2",
        "head": "linear",
        "finetune": "head",
        "classes": list(CLASSES),
        "preprocessing": PREP.to_dict(),
        "temperature": 1.5,
        "model_state": state,
        "config": {"data": "somewhere", "split_seed": 0, "split_fractions": [0.7, 0.15, 0.15], "max_images": None},
        "epoch": 3,
        "metrics": {"val_acc": 0.5},
    }


DROP = object()  # a field ``changed`` removes


def changed(*, weights: bool = False, **fields) -> Callable[[Path], None]:
    """A writer of the valid fields with ``fields`` replaced; ``a__b`` names key ``b`` inside ``a``."""

    def write(path: Path) -> None:
        ckpt = valid_fields(weights)
        for key, value in fields.items():
            *parents, last = key.split("__")
            target = ckpt
            for parent in parents:
                target = target[parent]
            if value is DROP:
                del target[last]
            else:
                target[last] = value
        torch.save(ckpt, path)

    return write


def truncated(path: Path) -> None:
    torch.save(valid_fields(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "a zip file, not a checkpoint")


def mismatched_weights(path: Path) -> None:
    torch.save({**valid_fields(), "model_state": {"backbone.conv1.weight": torch.zeros(8, 3, 3, 3)}}, path)


def torch_archive(path: Path, pickle_bytes: bytes) -> None:
    """A file laid out as torch.save lays one out (data.pkl and a version record), holding ``pickle_bytes``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")


def bytearray_bomb(path: Path) -> None:
    # A pickle of bytearray(2**30): torch's weights-only allow-list takes it and allocates a GiB from 150 bytes.
    torch_archive(path, b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00@\x85R.")


def rezipped(change: Callable[[str, bytes], bytes], **zip_options) -> Callable[[Path], None]:
    """A valid checkpoint written by torch.save, then its records written again through ``change(name, data)``."""

    def write(path: Path) -> None:
        torch.save(valid_fields(), path)
        with zipfile.ZipFile(path) as archive:
            records = {name: archive.read(name) for name in archive.namelist()}
        with zipfile.ZipFile(path, "w", **zip_options) as archive:
            for name, data in records.items():
                archive.writestr(name, change(name, data))

    return write


def extra_record(path: Path) -> None:
    torch.save(valid_fields(), path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("archive/notes.txt", "not from torch.save")


def nested(depth: int, width: int) -> list:
    """Lists that share one another: a few bytes pickled, ``width ** depth`` values printed."""
    value: list = []
    for _ in range(depth):
        value = [value] * width
    return value


def hostile(path: Path) -> None:
    torch.save({"format": FORMAT, "payload": RunsACommand(f"touch {path.parent / 'PWNED'}")}, path)


# name: (how to write it, what the refusal must say)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no preprocessing": (changed(weights=True, preprocessing=DROP), "preprocessing is missing"),
    "no temperature or weights": (changed(temperature=DROP, model_state=DROP), "temperature, model_state are missing"),
    "string temperature": (
        changed(weights=True, temperature="warm"),
        "temperature must be a finite number from 0.05 to 20; got 'warm'",
    ),
    "numeric string temperature": (changed(temperature="1.0"), "temperature must be a finite number from 0.05 to 20"),
    "bool temperature": (changed(temperature=True), "temperature must be a finite number from 0.05 to 20; got True"),
    "NaN temperature": (
        changed(weights=True, temperature=math.nan),
        "temperature must be a finite number from 0.05 to 20; got nan",
    ),
    "infinite temperature": (changed(temperature=math.inf), "temperature must be a finite number from 0.05 to 20"),
    "zero temperature": (
        changed(weights=True, temperature=0.0),
        "temperature must be a finite number from 0.05 to 20; got 0.0",
    ),
    "negative temperature": (
        changed(weights=True, temperature=-1.0),
        "temperature must be a finite number from 0.05 to 20; got -1.0",
    ),
    "huge input size": (
        changed(weights=True, preprocessing__input_size=[12000, 12000]),
        f"preprocessing.input_size must be two whole numbers of pixels, each from {MIN_INPUT_SIDE} to "
        f"{MAX_INPUT_SIDE}; got (12000, 12000)",
    ),
    "tiny input size": (changed(preprocessing__input_size=[8, 8]), "preprocessing.input_size must be two whole"),
    "input size as text": (changed(preprocessing__input_size="224"), "preprocessing.input_size must be two whole"),
    "three-sided input": (changed(preprocessing__input_size=[48, 48, 48]), "preprocessing.input_size must be two"),
    "no input size": (changed(preprocessing__input_size=DROP), "preprocessing.input_size is missing"),
    "huge source size": (
        changed(preprocessing__source_size=[200, 50000]),
        "preprocessing.source_size must be two whole numbers of pixels, each from "
        f"{MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}",
    ),
    "two means": (changed(preprocessing__mean=[0.5, 0.5]), "preprocessing.mean must be three finite numbers"),
    "NaN mean": (changed(preprocessing__mean=[0.5, math.nan, 0.5]), "preprocessing.mean must be three finite"),
    "zero std": (changed(preprocessing__std=[0.2, 0.0, 0.2]), "preprocessing.std must be three finite numbers from"),
    "preprocessing as text": (changed(preprocessing="224x224"), "preprocessing must be a dict"),
    "unknown colour constancy": (
        changed(preprocessing__colour_constancy="retinex"),
        "preprocessing.colour_constancy must be one of none, shades_of_gray",
    ),
    "unknown arch": (
        changed(arch="vgg16"),
        "arch must be one of resnet18, resnet50, mobilenet_v2, efficientnet_b0, densenet121, efficientnet_lite0, "
        "efficientnet_lite1, efficientnet_lite2; got 'vgg16'",
    ),
    "unknown head": (changed(head="conv"), "head must be one of mlp, linear; got 'conv'"),
    "unknown finetune": (changed(finetune="most"), "finetune must be one of head, last, full; got 'most'"),
    "classes reordered": (changed(classes=list(reversed(CLASSES))), "classes are in the order"),
    "classes as a number": (changed(classes=7), "classes must be the list"),
    "weights as a list": (changed(model_state=[torch.zeros(3)]), "model_state must map parameter names to tensors"),
    "weights as text": (changed(model_state={"head.1.bias": "zeros"}), "model_state must map parameter names"),
    "negative epoch": (changed(epoch=-1), "epoch must be a whole number from 0; got -1"),
    "config as a list": (changed(config=[1, 2]), "config must be a dict"),
    "fractions as text": (changed(config__split_fractions=["a", "b", "c"]), "config.split_fractions must be three"),
    "seed past scikit-learn": (changed(config__split_seed=2**40), "config.split_seed must be a whole number from 0"),
    "negative max_images": (changed(config__max_images=-5), "config.max_images must be empty or a whole number from 0"),
    "no marker": (changed(format="something/2"), f"no {FORMAT!r} marker"),
    "truncated file": (truncated, "is not a readable checkpoint"),
    "zip that is not a checkpoint": (foreign_zip, "is not a readable checkpoint"),
    "empty file": (lambda path: path.write_bytes(b""), "is not a readable checkpoint"),
    "weights of another shape": (mismatched_weights, "does not rebuild into a mobilenet_v2 model"),
    "pickle that runs a command": (hostile, "may be malicious"),
    # Allocations the file asks for, refused before torch.load makes them (the 1 GiB file bound means what it says).
    "bytearray bomb": (bytearray_bomb, "would import and call __builtin__.bytearray"),
    "extra bytearray field": (changed(weights=True, blob=bytearray(64)), "bytearray, which a Lesion Lab"),
    "deflated records": (rezipped(lambda name, data: data, compression=zipfile.ZIP_DEFLATED), "is compressed"),
    "tensor longer than its record": (
        rezipped(lambda name, data: data[:8] if name.endswith("/data/0") else data),
        "but its record holds 8",
    ),
    "record torch never writes": (extra_record, "holds 'archive/notes.txt', which torch.save never writes"),
    "unknown field": (changed(weights=True, notes="hello"), "'notes' is not a field of a Lesion Lab checkpoint"),
    "unknown preprocessing field": (changed(preprocessing__crop=0.9), "preprocessing holds crop; it may hold only"),
    "config nested 40 levels": (changed(config__deep=nested(40, 2)), "nests deeper than 8 levels"),
    "config wide and shared": (changed(config__wide=nested(3, 1000)), "more than 200,000 values"),
    "config nested past its depth": (changed(config__deep=[[["x"]]]), "config nests deeper than 3 levels"),
    "negative mel_threshold": (changed(weights=True, mel_threshold=-1.0), "mel_threshold must be a probability"),
    "NaN mel_threshold": (changed(mel_threshold=math.nan), "mel_threshold must be a probability from 0 to 1; got nan"),
    "mel_threshold above 1": (changed(mel_threshold=2.0), "mel_threshold must be a probability from 0 to 1; got 2.0"),
    "mel_threshold as text": (changed(weights=True, mel_threshold="0.3"), "mel_threshold must be a probability"),
    "mel_threshold as a list": (changed(mel_threshold=[0.3]), "mel_threshold must be a probability"),
    "vanishing temperature": (changed(weights=True, temperature=1e-30), "temperature must be a finite number from"),
    "vanishing std": (changed(weights=True, preprocessing__std=[1e-30] * 3), "preprocessing.std must be three"),
    "mean outside the pixels": (changed(preprocessing__mean=[5.0, 0.5, 0.5]), "preprocessing.mean must be three"),
    "config name a number": (changed(weights=True, config__name=5), "config.name must be a run folder's name; got 5"),
    "config name a path": (changed(config__name="../escape"), "config.name must be a run folder's name"),
    "fractions over 1": (changed(weights=True, config__split_fractions=[1, 1, 0]), "summing to 1"),
    "NaN fractions": (changed(config__split_fractions=[math.nan, 0.5, 0.5]), "config.split_fractions must be three"),
}
# The classes of malformed file the command lines are also run on for real, one process each: every class goes
# through both mains in-process below (where a warning that a process would print fails it); these prove the wiring
# of `python -m` end to end on the failures that happen deepest (torch's unpickler, a truncated archive, an allocation
# the bounds must prevent). Both commands open a model file through core.inference.opening.open_predictor, so each
# class is run through one of them, and each command sees two.
IN_SUBPROCESS = {
    "pickle that runs a command": "predict",
    "truncated file": "evaluate",
    "huge input size": "predict",
    "bytearray bomb": "evaluate",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    paths = {}
    for i, (name, (write, _)) in enumerate(CORPUS.items()):
        paths[name] = folder / f"{i:02d}.pt"
        write(paths[name])
    return paths


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "lesion.jpg"
    make_image(4, np.random.default_rng(0), size=(64, 48)).save(path)  # above the upload minimum
    return path


def test_the_valid_fields_themselves_pass(tmp_path):
    # So each refusal below is the doing of the one field it changes.
    changed()(tmp_path / "stand-in.pt")
    assert read_checkpoint(tmp_path / "stand-in.pt")["temperature"] == 1.5
    changed(weights=True)(tmp_path / "complete.pt")
    model, _ = load_model(tmp_path / "complete.pt")
    assert model.arch == "mobilenet_v2"


@pytest.mark.parametrize("case", CORPUS)
def test_each_malformed_checkpoint_is_refused_naming_what_is_wrong(corpus, case):
    with pytest.raises(CheckpointError) as refused:
        load_model(corpus[case])
    message = str(refused.value)
    assert CORPUS[case][1] in message and str(corpus[case]) in message
    assert "weights_only" not in message and "will likely succeed" not in message


@pytest.mark.integration
@pytest.mark.parametrize("case", CORPUS)
def test_both_command_lines_answer_a_malformed_checkpoint_with_one_line(corpus, image, tiny_root, case, capsys):
    with no_printed_warnings():
        assert predict_cli.main([str(corpus[case]), str(image)]) == 2
        assert evaluate_cli.main(["--checkpoint", str(corpus[case]), "--data", str(tiny_root), "--bootstrap", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") and CORPUS[case][1] in line for line in lines), err


@pytest.mark.integration
@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_command_lines_exit_2_without_a_traceback(corpus, image, tiny_root, case):
    if IN_SUBPROCESS[case] == "predict":
        done = run_cli("core.cli.predict", corpus[case], image)
    else:
        done = run_cli("core.cli.evaluate", "--checkpoint", corpus[case], "--data", tiny_root, "--bootstrap", "0")
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ")
    assert CORPUS[case][1] in done.stderr
    if case == "pickle that runs a command":
        assert not (corpus[case].parent / "PWNED").exists()


def test_a_pickle_that_runs_a_command_is_not_run_and_not_advised(tmp_path):
    hostile(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    message = str(refused.value)
    # torch's own message says that weights_only=False "will likely succeed": for this file, that runs the command.
    assert "weights_only" not in message and "likely succeed" not in message
    assert "posix.system" in message and "may be malicious" in message and "not loaded" in message


def test_a_file_too_large_to_be_a_checkpoint_is_refused_unread(tmp_path):
    path = tmp_path / "huge.pt"
    with open(path, "wb") as fh:
        fh.truncate(MAX_CHECKPOINT_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match=r"1\.0 GiB"):
        read_checkpoint(path)


def test_sizes_out_of_bounds_are_refused_wherever_a_preprocessing_is_made(tiny_root):
    for bad in ((MAX_INPUT_SIDE + 1, 224), (224, MIN_INPUT_SIDE - 1), (224.0, 224.0), (True, 224)):
        with pytest.raises(ValueError, match="input_size must be two whole numbers"):
            Preprocessing(input_size=bad)
        # The trainer refuses to start a run whose checkpoints could not be loaded.
        with pytest.raises(ValueError, match="input_size must be two whole numbers"):
            TrainConfig(data=str(tiny_root), input_size=bad)
    with pytest.raises(ValueError, match="source_size"):
        TrainConfig(data=str(tiny_root), source_size=(200, MAX_INPUT_SIDE * 2))
    assert Preprocessing(input_size=(MIN_INPUT_SIDE, MAX_INPUT_SIDE)).input_size == (MIN_INPUT_SIDE, MAX_INPUT_SIDE)


def test_evaluation_batches_hold_a_bounded_number_of_pixels():
    assert forward.bounded_batch_size(64, (224, 224)) == 64
    assert forward.bounded_batch_size(64, (150, 200)) == 64
    assert forward.bounded_batch_size(64, (MAX_INPUT_SIDE, MAX_INPUT_SIDE)) == 3
    assert forward.bounded_batch_size(8, (32, 32)) == 8
    for size in ((MAX_INPUT_SIDE, MAX_INPUT_SIDE), (448, 448), (MIN_INPUT_SIDE, MIN_INPUT_SIDE)):
        assert forward.bounded_batch_size(10_000, size) * size[0] * size[1] <= forward.MAX_BATCH_PIXELS
    # With test-time augmentation every image brings its views: the images per pass shrink by their number.
    views = view_count(True)
    assert forward.bounded_batch_size(64, (224, 224), tta=True) == 64 // views
    assert forward.bounded_batch_size(32, (150, 200), tta=True) == 26  # 64·224² pixels hold 107 views of 150×200
    assert forward.bounded_batch_size(64, (MAX_INPUT_SIDE, MAX_INPUT_SIDE), tta=True) == 1


# ---------------------------------------------------------------------------
# Weights that load but cannot predict


@pytest.fixture(scope="module")
def broken_weights(tmp_path_factory) -> Path:
    """A complete checkpoint whose head holds NaN and infinity: every field is in bounds, the output is NaN."""
    torch.manual_seed(0)
    model = build_model("resnet18", weights="none", finetune="head", head="linear").eval()
    with torch.no_grad():
        model.head[-1].weight[0, 0] = math.nan
        model.head[-1].bias[1] = math.inf
    path = tmp_path_factory.mktemp("broken") / "nan.pt"
    atomic_save(
        checkpoint_dict(
            model, PREP, head="linear", temperature=1.0, config={"split_seed": 0, "split_fractions": [0.0, 0.0, 1.0]}
        ),
        path,
    )
    return path


def test_broken_weights_never_become_a_prediction(broken_weights, image, tiny_root, capsys):
    predictor = open_predictor(broken_weights)  # loads: nothing in the file is out of bounds
    with pytest.raises(PredictionError, match="no valid probabilities for this image"):
        predictor.predict(image)
    with pytest.raises(PredictionError, match="no valid probabilities"):
        predictor.predict(io.BytesIO(image.read_bytes()), tta=True)
    with pytest.raises(PredictionError, match=r"\d+ of \d+ images"):
        evaluation_evaluate.evaluate_checkpoint(broken_weights, tiny_root, bootstrap=0)
    assert predict_cli.main([str(broken_weights), str(image)]) == 2
    assert evaluate_cli.main(["--checkpoint", str(broken_weights), "--data", str(tiny_root), "--bootstrap", "0"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") and "no valid probabilities" in line for line in lines)
    assert out == ""  # no table of NaN percentages, no report
