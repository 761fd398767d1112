"""Predicting one uploaded image with a saved checkpoint, and the ``lesionlab predict`` CLI.

The :class:`Predictor` decodes exactly as training did (EXIF rotation, mode
conversion, the training images' source size, then the checkpoint's eval
transform) and applies the checkpoint's fitted temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT, class_index
from core.common.runtime import tune_allocator
from core.common.waiting_line import WaitingLine
from core.data.dataset import LesionDataset
from core.data.images import ImageSource
from core.data.preprocessing import Preprocessing, eval_transform, load_for_model
from core.inference.explain import feature_maps, gradcam
from core.inference.forward import (
    bounded_batch_size,
    check_probabilities,
    predict_probs,
    prediction_views,
    tta_description,
    view_count,
    view_probabilities,
)
from core.inference.unfamiliar import UnfamiliarCheck, check_unfamiliar, load_detector
from core.metrics.classification import MELANOMA_RULE, REFERRAL_RULES, ReferralRule
from core.models.checkpoints import load_model
from core.models.metadata import MetadataEncoding, describe

if TYPE_CHECKING:
    pass
from core.inference.prediction import Prediction

DISCLAIMER = "For research and education only; not a medical diagnosis."


# A referral rule's threshold when the model file records none of its own (chosen on its validation split for the
# rule's sensitivity, core.metrics.classification.REFERRAL_RULES): P at or above it counts as positive. Files made
# before a rule existed fall back to it, and every view that shows the rule says that it is this default.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Referral:
    """One referral rule as a model applies it: the ``threshold`` its file records, else the default (``recorded``
    False)."""

    rule: ReferralRule
    threshold: float
    recorded: bool

    def score(self, prediction: Prediction) -> float:
        return float(self.rule.score(prediction.probs))

    def refers(self, prediction: Prediction) -> bool:
        return self.score(prediction) >= self.threshold


def referrals(checkpoint: dict) -> tuple[Referral, ...]:
    """The referral rules of a loaded checkpoint dict, in :data:`REFERRAL_RULES` order."""
    found = []
    for rule in REFERRAL_RULES:
        value = checkpoint.get(rule.field)
        found.append(Referral(rule, DEFAULT_THRESHOLD if value is None else float(value), value is not None))
    return tuple(found)


# Test-time augmentation (core.inference.forward: the four flips at each zoom of TTA_SCALES) is on by default on
# Diagnose, on Batch, in `lesionlab evaluate` and in Predictor: on the reference model's validation split the flips
# helped on every count measured (balanced accuracy, melanoma sensitivity and specificity, ECE; bench/tta.py, figures
# in docs/BENCHMARKS.md). Zooms are not in TTA_SCALES until a full validation run shows they help.
USE_TTA_BY_DEFAULT = True


TTA_HELP = (
    f"Average the prediction over {view_count(True)} views of the image ({tta_description(True)}), in one pass. "
    "On the reference model's validation split (1519 images) flip averaging raised balanced accuracy from 74.5 % "
    "to 74.9 % and melanoma sensitivity at P(mel) ≥ 50 % from 59.1 % to 63.2 % (specificity 94.4 % → 94.7 %), "
    "and lowered the calibration error (ECE) from 0.053 to 0.046; it costs a few times one pass's time per "
    "image on the CPU (docs/BENCHMARKS.md)."
)


class ModelView(Protocol):
    """What a batch builder needs of a model: its preprocessing (a Predictor, or one member of an ensemble)."""

    prep: Preprocessing
    transform: Callable


# Builds the batches of a split for one model, with that model's preprocessing.
BatchesFor = Callable[[ModelView], Iterable]


def dataset_batches(
    dataset_for: Callable[[ModelView], torch.utils.data.Dataset],
    batch_size: int = 64,
    num_workers: int = 0,
    tta: bool = False,
) -> BatchesFor:
    """The batches of the (image, label) dataset ``dataset_for(model)`` makes with a model's own preprocessing,
    for any model, as many images a batch as its input size allows (:func:`bounded_batch_size`)."""

    def batches_for(model: ModelView) -> torch.utils.data.DataLoader:
        size = bounded_batch_size(batch_size, model.prep.input_size, tta)
        return torch.utils.data.DataLoader(dataset_for(model), batch_size=size, num_workers=num_workers)

    return batches_for


def frame_batches(frame: pd.DataFrame, batch_size: int = 64, num_workers: int = 0, tta: bool = False) -> BatchesFor:
    """The batches of ``frame``'s image files (a dataset index's rows) for any model (:func:`dataset_batches`)."""
    return dataset_batches(
        lambda model: LesionDataset.from_frame(frame, model.transform, model.prep), batch_size, num_workers, tta
    )


class Predictor:
    """A checkpoint loaded once, ready to classify and explain images.

    Thread-safe: Streamlit sessions share one instance, so the model is only touched in
    ``line`` (a :class:`core.common.waiting_line.WaitingLine`, whose length a page shows while a session waits)
    and callers reach it only through these methods. Model passes are serialised
    (they use every core anyway, and CAM and feature-map hooks must not see other threads' passes).
    """

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu"):
        tune_allocator()
        model, ckpt = load_model(checkpoint)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.checkpoint = ckpt
        self.path = Path(checkpoint)
        self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
        self.temperature = float(ckpt["temperature"])
        self.transform = eval_transform(self.prep)
        self.referrals = referrals(ckpt)
        # The measured "unfamiliar image" detector saved beside the checkpoint (bench/similar.py), if any.
        self.detector = load_detector(self.path)
        self.line = WaitingLine()  # every model pass joins it: one at a time, answers first, in arrival order

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def largest_input_size(self) -> tuple[int, int]:
        """The (height, width) that bounds how many images go through together (:func:`bounded_batch_size`)."""
        return self.prep.input_size

    def referral(self, rule: ReferralRule) -> Referral:
        return next(r for r in self.referrals if r.rule == rule)

    @property
    def mel_threshold(self) -> float:
        return self.referral(MELANOMA_RULE).threshold

    @property
    def thresholds(self) -> dict[str, float]:
        """Each rule's threshold by its field, as ``compute_metrics`` takes them."""
        return {r.rule.field: r.threshold for r in self.referrals}

    # How many times split_probabilities reads each image: once here, once per member in an ensemble (for
    # progress totals).
    passes = 1

    def split_probabilities(
        self,
        batches_for: BatchesFor,
        *,
        tta: bool = False,
        metadata: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (n, classes) and labels (n,) of a whole split: the (images, labels) batches
        that ``batches_for(self)`` builds with this model's preprocessing (``.prep``, ``.transform``).
        ``metadata``: one encoded row per image, for a model that takes age, sex and site. ``progress(done)``
        hears the images done. An ensemble overrides this one method, so evaluation and the robustness report
        treat both alike."""
        probs, labels = predict_probs(
            self.model,
            batches_for(self),
            self.device,
            temperature=self.temperature,
            tta=tta,
            progress=progress,
            metadata=metadata,
        )
        check_probabilities(probs)
        return probs, labels

    @property
    def metadata_encoding(self) -> MetadataEncoding | None:
        """How the model reads age, sex and body site (:mod:`core.models.metadata`); None when it takes the image
        only."""
        return self.model.metadata_encoding

    @property
    def uses_metadata(self) -> bool:
        return self.metadata_encoding is not None

    def metadata_note(self, metadata: Mapping[str, object] | None) -> tuple[bool, str]:
        """Whether ``metadata`` ({"age", "sex", "site"}, any left out) will be used, and a sentence saying so."""
        given = describe(metadata)
        if not self.uses_metadata:
            return (
                False,
                f"This model takes the image only; the metadata given ({given}) were ignored." if given else "",
            )
        if not given:
            return False, "No age, sex or body site given: the model predicted from the image alone (all unknown)."
        return True, f"Metadata used: {given} (fields not given count as unknown)."

    def preprocess(self, source: ImageSource, *, upload: bool = True) -> tuple[Image.Image, torch.Tensor]:
        """The decoded RGB image and the (1, 3, H, W) model input; raises :class:`ImageError`."""
        image = load_for_model(source, self.prep, upload=upload)
        return image, self.transform(image).unsqueeze(0).to(self.device)

    def predict(
        self,
        source: ImageSource,
        tta: bool = False,
        *,
        upload: bool = True,
        metadata: Mapping[str, object] | None = None,
    ) -> Prediction:
        """Classify an image given as a path, bytes or a binary file object.

        ``metadata`` ({"age": 45, "sex": "male", "site": "back"}, any field left out or None for unknown)
        reaches a model that takes it; a model that does not ignores it, and the prediction says so. A value
        the encoding does not know raises :class:`core.models.metadata.MetadataError`.

        With ``tta`` the probabilities are the mean over the image and its horizontal,
        vertical and double flips. An image is refused (:class:`ImageError`) when it is too small or too
        elongated to diagnose (``core.data.images.MIN_SIDE``, ``MAX_ASPECT``); ``upload=False`` lifts that for
        a dataset image, which its evaluation already took as it is. Raises :class:`PredictionError` when
        the model's output is not a probability distribution.
        """
        return self.predict_batch([self.preprocess(source, upload=upload)], tta, metadata=[metadata])[0]

    def predict_batch(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        tta: bool = False,
        *,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
    ) -> list[Prediction]:
        """Classify images already decoded by :meth:`preprocess`, in one forward pass (a batch of files goes
        many times faster than one at a time); ``metadata``, one per image, as :meth:`predict` takes it.
        Raises :class:`PredictionError` when any output is not a probability distribution: broken weights
        break every image alike."""
        if not inputs:
            return []
        metadata = list(metadata) if metadata is not None else [None] * len(inputs)
        if len(metadata) != len(inputs):
            raise ValueError(f"{len(metadata)} metadata for {len(inputs)} images")
        x = torch.cat([tensor for _, tensor in inputs])
        encoding = self.model.metadata_encoding
        # Checked for every model: a typo is an error, whether or not this model would have used the field.
        rows = torch.from_numpy(np.stack([(encoding or MetadataEncoding()).encode_mapping(m) for m in metadata]))
        with self.line, torch.inference_mode():
            features = self.model.backbone(prediction_views(x, tta))
            logits = self.model.classify(features, rows if encoding is not None else None)
        all_probs = view_probabilities(logits, len(x), self.temperature).double().cpu().numpy()
        check_probabilities(all_probs)
        predictions = self._predictions(inputs, x, all_probs, tta, metadata)
        # The first view of every image is the image itself: its pooled features are the embedding that similar
        # cases and the unfamiliar-image score compare, kept so that they cost no second backbone pass.
        embeddings = features[: len(x)].float().cpu().numpy()
        for prediction, embedding in zip(predictions, embeddings, strict=True):
            prediction.embedding = embedding
        return predictions

    def _predictions(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        x: torch.Tensor,
        all_probs: np.ndarray,
        tta: bool,
        metadata: Sequence[Mapping[str, object] | None],
    ) -> list[Prediction]:
        predictions = []
        for i, ((image, _), probs) in enumerate(zip(inputs, all_probs, strict=True)):
            top = int(probs.argmax())
            used, note = self.metadata_note(metadata[i])
            predictions.append(
                Prediction(
                    probs=probs,
                    probabilities={code: float(p) for code, p in zip(CLASSES, probs, strict=True)},
                    top_class=CLASSES[top],
                    top_name=DISPLAY_NAMES[CLASSES[top]],
                    confidence=float(probs[top]),
                    malignant_probability=float(
                        sum(p for code, p in zip(CLASSES, probs, strict=True) if code in MALIGNANT)
                    ),
                    input_tensor=x[i : i + 1],
                    image=image,
                    tta=tta,
                    metadata_used=used,
                    metadata_note=note,
                )
            )
        return predictions

    def explain(self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None) -> np.ndarray:
        """A class activation map (input size, values in [0, 1]) for ``target`` (index or code;
        default: the predicted class). Lay it over ``prediction.image`` with ``core.inference.explain.overlay``."""
        if target is None:
            index = prediction.top_index
        elif isinstance(target, str):
            index = class_index(target)
        else:
            index = int(target)
        with self.line.later:  # a heatmap waits behind every answer in line
            return gradcam(self.model, prediction.input_tensor, index, method)

    def embed(self, prediction: Prediction) -> np.ndarray:
        """The pooled backbone features of the predicted image (what similar cases and the unfamiliar-image
        score compare), computed once per prediction."""
        if prediction.embedding is None:
            with self.line, torch.inference_mode():
                features = self.model.backbone(prediction.input_tensor)[0]
            prediction.embedding = features.float().cpu().numpy()
        return prediction.embedding

    def unfamiliar(self, prediction: Prediction) -> UnfamiliarCheck:
        """Whether the image is unlike the dermoscopy the model learnt from, and why in words: the measured
        feature-space score when the checkpoint has a saved detector, and the colour heuristic."""
        embedding = self.embed(prediction) if self.detector is not None else None
        return check_unfamiliar(prediction.image, embedding, self.detector)

    def layer_names(self) -> list[str]:
        """The layers :meth:`feature_maps` shows, shallow to deep."""
        with self.line.later:
            return self.model.feature_layers()

    def feature_maps(self, prediction: Prediction, layer: str) -> np.ndarray:
        """The activations (C, h, w) of ``layer`` (one of :meth:`layer_names`) for the predicted image;
        raises ValueError for a layer the model does not have."""
        with self.line.later:
            return feature_maps(self.model, prediction.input_tensor, layer)
