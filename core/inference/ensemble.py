"""Ensembles: several trained checkpoints used as one model, and ``lesionlab ensemble`` to make one from runs.

**The file.** One file (marker :data:`core.models.checkpoints.ENSEMBLE_FORMAT`) holds every member's whole checkpoint
dict, the members' run names, the ensemble's temperature and its config. One file rather than a manifest beside
member files: it is copied, shipped in ``checkpoints/`` and picked in the app like any checkpoint, cannot lose a
member or point at a retrained one, is written atomically, loads with one ``torch.load(weights_only=True)``
within the same size bound, and each member is checked by the same checks as a checkpoint. The price is disk:
a member's weights are stored again beside its run folder's ``best.pt`` (9 MB for a MobileNetV2).

**What is averaged and scaled.** Each member's calibrated probabilities ``softmax(z_k / T_k)`` (``T_k`` its own
validation temperature: what it says when it predicts alone) are averaged, and one ensemble temperature ``T``
rescales the log of that mean: ``p = softmax(log(mean_k p_k) / T)``, ``T`` fitted by
:func:`core.metrics.calibration.fit_temperature` on the validation split. Probabilities rather than logits are averaged
because members of different backbones have logits on different scales, and the mean of probabilities is the
deep-ensemble rule (Lakshminarayanan et al., 2017). Members are calibrated first so that the agreement and the
P(melanoma) spread Diagnose shows compare each member's honest statement. A mean of calibrated members that
disagree is under-confident (Wu & Gales, 2021), so the ensemble gets its own temperature, fitted on the same
validation split as the members' ones; like any temperature it never changes the predicted class.

**Preprocessing.** Each member keeps its own input size and normalisation. They must share the size their
training images had on disk (``source_size``): an upload is decoded once, to that size, for all of them.
Similar cases, the unfamiliar-image score and the feature maps use the first member's network: they compare
one network's features, which an average over different backbones would not give.

An ensemble trained with ``lesionlab train --ensemble K`` (or combined here from finished runs) is a run
folder like any other: ``best.pt`` is the ensemble file, ``evaluation.json`` and ``test_predictions.csv`` its
test results, so Diagnose, Batch, Quiz, Evaluate and Compare list it with the runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from core.common.labels import NUM_CLASSES, class_index
from core.common.runtime import tune_allocator
from core.common.waiting_line import WaitingLine
from core.data.preprocessing import Preprocessing, eval_transform
from core.inference.explain import gradcam
from core.inference.forward import check_probabilities, class_probabilities, predict_probs
from core.inference.prediction import MemberVotes, Prediction
from core.inference.predictor import BatchesFor, Predictor, frame_batches, referrals
from core.inference.unfamiliar import load_detector
from core.metrics.calibration import fit_temperature, softmax
from core.models.architectures import LesionNet
from core.models.checkpoints import model_from_checkpoint
from core.models.ensemble_file import read_ensemble

# The mean of the members' probabilities is floored before its log: a class every member rules out
# (rounded to 0 in float32) must not make the ensemble's log-probability -inf.
PROB_FLOOR = 1e-12


MELANOMA = class_index("mel")


def mean_log_probs(member_probs: np.ndarray) -> np.ndarray:
    """log of the mean over members of (K, n, classes) calibrated probabilities: the ensemble's scores before its
    temperature (what :func:`fit_ensemble_temperature` fits and the test record keeps as logits)."""
    mean = np.asarray(member_probs, dtype=np.float64).mean(axis=0)
    return np.log(np.clip(mean, PROB_FLOOR, None))


def combine(member_probs: np.ndarray, temperature: float) -> np.ndarray:
    """The ensemble's calibrated probabilities (n, classes) from its members' (K, n, classes)."""
    return softmax(mean_log_probs(member_probs), temperature)


def fit_ensemble_temperature(labels: np.ndarray, member_probs: np.ndarray) -> float:
    """The one ensemble temperature, fitted on the validation split's members' calibrated probabilities."""
    return fit_temperature(labels, mean_log_probs(member_probs))


@dataclass(frozen=True)
class Member:
    name: str
    model: LesionNet
    prep: Preprocessing
    transform: Callable  # its eval transform
    temperature: float


def _arch_summary(archs: Sequence[str]) -> str:
    counts = Counter(archs)
    parts = [f"{n} × {arch}" if n > 1 else arch for arch, n in counts.items()]
    return f"ensemble of {len(archs)} ({', '.join(parts)})"


class EnsemblePredictor(Predictor):
    """:class:`core.inference.predictor.Predictor` for an ensemble file (``Predictor(path)`` returns one), with the same
    methods. ``model``, ``prep`` and ``transform`` are the first member's: the network for embeddings, feature
    maps and similar cases. Predictions carry :class:`MemberVotes`; :meth:`explain` averages the members'
    maps. Thread-safe as the base class: the members are touched only under its lock."""

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu"):
        tune_allocator()
        self.path = Path(checkpoint)
        self.checkpoint = read_ensemble(self.path)
        self.device = torch.device(device)
        self.members = [
            Member(
                name,
                model_from_checkpoint(ckpt, f"{self.path}, member {i + 1} ({name})").to(self.device),
                prep := Preprocessing.from_dict(ckpt["preprocessing"]),
                eval_transform(prep),
                float(ckpt["temperature"]),
            )
            for i, (name, ckpt) in enumerate(
                zip(self.checkpoint["member_names"], self.checkpoint["members"], strict=True)
            )
        ]
        lead = self.members[0]
        self.model, self.prep, self.transform = lead.model, lead.prep, lead.transform
        self.temperature = float(self.checkpoint["temperature"])
        self.referrals = referrals(self.checkpoint)
        self.detector = load_detector(self.path)
        self.line = WaitingLine()  # every model pass joins it: one at a time, answers first, in arrival order

    @property
    def arch(self) -> str:
        return _arch_summary([m.model.arch for m in self.members])

    @property
    def largest_input_size(self) -> tuple[int, int]:
        """The largest member's: every member takes the whole batch, so it bounds the batch for all."""
        return max((m.prep.input_size for m in self.members), key=lambda size: size[0] * size[1])

    def _member_inputs(self, member: Member, images: Sequence[Image.Image], lead: torch.Tensor) -> torch.Tensor:
        """The member's own input batch: the first member's when they preprocess alike, else its own transform
        of the decoded images."""
        if member.prep == self.prep:
            return lead
        return torch.stack([member.transform(image) for image in images]).to(self.device)

    @property
    def metadata_encoding(self) -> None:
        """Ensembles take the image only: their members are combined on images alone."""
        return None

    def predict_batch(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        tta: bool = False,
        *,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
    ) -> list[Prediction]:
        """As :meth:`Predictor.predict_batch`: each member's calibrated probabilities (flip-averaged with
        ``tta``), combined by :func:`combine`; every prediction carries its :class:`MemberVotes`. ``metadata``
        is not used, and each prediction says so."""
        if not inputs:
            return []
        metadata = list(metadata) if metadata is not None else [None] * len(inputs)
        images = [image for image, _ in inputs]
        x = torch.cat([tensor for _, tensor in inputs])
        with self.line, torch.inference_mode():
            member_probs = np.stack(
                [
                    class_probabilities(m.model, self._member_inputs(m, images, x), m.temperature, tta)
                    .double()
                    .cpu()
                    .numpy()
                    for m in self.members
                ]
            )
        check_probabilities(member_probs.reshape(-1, NUM_CLASSES))
        probs = combine(member_probs, self.temperature)
        check_probabilities(probs)
        predictions = self._predictions(inputs, x, probs, tta, metadata)
        names = tuple(m.name for m in self.members)
        for i, prediction in enumerate(predictions):
            prediction.members = MemberVotes(names, member_probs[:, i], prediction.top_class)
        return predictions

    def explain_members(
        self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None
    ) -> list[np.ndarray]:
        """Each member's class activation map for ``target`` (default: the ensemble's predicted class), resized
        to ``prediction.image`` (members may have different input sizes), values in [0, 1]."""
        index = prediction.top_index if target is None else class_index(target) if isinstance(target, str) else target
        width, height = prediction.image.size
        maps = []
        with self.line.later:  # heatmaps wait behind every answer in line
            for m in self.members:
                x = self._member_inputs(m, [prediction.image], prediction.input_tensor)
                heat = gradcam(m.model, x, int(index), method)
                maps.append(cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR))
        return maps

    def explain(self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None) -> np.ndarray:
        """The mean of the members' maps (:meth:`explain_members`), at the size of ``prediction.image``."""
        return np.mean(self.explain_members(prediction, method, target), axis=0).clip(0.0, 1.0).astype(np.float32)

    @property
    def passes(self) -> int:
        return len(self.members)

    def split_probabilities(
        self,
        batches_for: BatchesFor,
        *,
        tta: bool = False,
        metadata: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Predictor.split_probabilities`: each member reads the split with its own preprocessing
        (``batches_for(member)``) and temperature, and :func:`combine` makes one distribution with the ensemble's
        temperature. ``metadata`` is not used (members take the image alone); ``progress`` counts every pass."""
        member_probs, labels = self.member_probabilities(batches_for, tta=tta, progress=progress)
        probs = combine(member_probs, self.temperature)
        check_probabilities(probs)
        return probs, labels

    def frame_probabilities(
        self,
        frame: pd.DataFrame,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        tta: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every member's calibrated probabilities (K, n, classes) over the images of ``frame`` (a dataset index's
        rows) with its own preprocessing, and their labels (n,): what the ensemble's temperature is fitted on."""
        batches = frame_batches(frame, batch_size, num_workers, tta)
        return self.member_probabilities(batches, tta=tta, progress=progress)

    def member_probabilities(
        self, batches_for: BatchesFor, *, tta: bool = False, progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each member's calibrated probabilities (K, n, classes) of the batches ``batches_for(member)`` builds
        with that member's preprocessing: the same images, in the same order, for every member. ``progress(done)``
        counts the images of every member's pass, one after another."""
        outputs, labels, before = [], None, 0
        for m in self.members:
            hear = (lambda done, before=before: progress(before + done)) if progress else None
            probs, labels = predict_probs(
                m.model, batches_for(m), self.device, temperature=m.temperature, tta=tta, progress=hear
            )
            outputs.append(probs.astype(np.float64))
            before += len(labels)
        return np.stack(outputs), labels
