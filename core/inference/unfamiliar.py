"""The "unfamiliar image" warning: is an upload like the dermoscopy the model learnt from?

One combined score decides, a logistic regression over cheap signals of the image:

* the cosine distance from the image's pooled features to its ``k``-th nearest training image (Sun et al.,
  "Out-of-distribution detection with deep nearest neighbors", ICML 2022): an image unlike every training image is
  far from all of them, whatever its predicted class;
* its colour and texture statistics (:func:`image_statistics`): how much of it is grey, white, dark or warm-hued,
  its saturation, hue, brightness, edges and colourfulness. The distance alone missed whole kinds of picture that
  these catch (greyscale photographs, fundus photographs, colour wheels: issue 24), and they miss what it catches.

Each signal enters as its distance from the median validation dermoscopy in validation standard deviations, signed
and unsigned (so that too much and too little saturation can both count). The regression is fitted on the
validation split's dermoscopy against the ``fit/`` part of a generated set of non-dermoscopic pictures
(``tests/data/unfamiliar``, ``tests/data/make_unfamiliar.py``), with the classes weighted equally, and its threshold
is the out-of-fold ``1 - false_alarm`` quantile of the validation dermoscopy's scores. ``bench/similar.py`` fits
it, measures it on the test split and the ``held-out/`` part, and saves it beside the checkpoint
(``NAME.unfamiliar.npz``). Without a detector the colour heuristic of :func:`dermoscopy_check` is all there is; with
one, its findings still describe a flagged image in words.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors

from core.common.formatting import format_bytes
from core.common.schema import Field, SchemaError, check_schema, number, probability, text, whole
from core.inference.similar import unit

# Calibrated on 3000 HAM10000 images: 1 % have fewer warm pixels than this, none are mostly grey or white.
MIN_WARM_FRACTION = 0.25


MAX_GREY_FRACTION = 0.7


MAX_WHITE_FRACTION = 0.4


# The image statistics the combined score reads, in the order a detector file stores them, with how a reason names
# each one and writes its value.
IMAGE_STATISTICS: dict[str, tuple[str, str]] = {
    "grey_fraction": ("share of colourless pixels", "{:.0%}"),
    "white_fraction": ("share of plain white pixels", "{:.0%}"),
    "warm_fraction": ("share of skin-like (reddish) hues", "{:.0%}"),
    "dark_fraction": ("share of black pixels", "{:.0%}"),
    "saturation": ("colour saturation", "{:.2f}"),
    "saturation_spread": ("spread of saturation", "{:.2f}"),
    "hue_x": ("mean hue (red–cyan axis)", "{:+.2f}"),
    "hue_y": ("mean hue (yellow–blue axis)", "{:+.2f}"),
    "brightness": ("brightness", "{:.2f}"),
    "brightness_spread": ("spread of brightness", "{:.2f}"),
    "edges": ("sharp edges", "{:.3f}"),
    "colourfulness": ("colourfulness", "{:.2f}"),
}
# Every signal of the combined score: the feature distance, then the image statistics.
SIGNALS = ("distance", *IMAGE_STATISTICS)


@dataclass(frozen=True)
class ImageCheck:
    looks_dermoscopic: bool
    reasons: tuple[str, ...]
    statistics: dict[str, float]  # image_statistics(image), the grey, white and warm shares among them


def image_statistics(image: Image.Image) -> dict[str, float]:
    """Cheap colour and texture statistics of ``image`` (:data:`IMAGE_STATISTICS`), on a 64×48 thumbnail (edges on
    the image as given, the model's input size)."""
    thumb = image.convert("RGB").resize((64, 48), Image.Resampling.BILINEAR)
    small = np.asarray(thumb, dtype=np.float32) / 255
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    hi, lo = small.max(axis=-1), small.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1e-6)
    # The hue's mean direction, weighted by saturation and leaving out black: a colour wheel's cancels out (near 0),
    # skin's points at red-orange.
    hue = np.asarray(thumb.convert("HSV"), np.float32)[..., 0] / 255 * 2 * np.pi
    weight = saturation * (hi > 0.1)
    total = max(float(weight.sum()), 1e-6)
    luminance = np.asarray(image.convert("L"), np.float32) / 255
    edges = np.hypot(np.diff(luminance, axis=1)[:-1], np.diff(luminance, axis=0)[:, :-1])
    # Hasler & Süsstrunk's colourfulness (2003) on the opponent axes red-green and yellow-blue.
    rg, yb = r - g, (r + g) / 2 - b
    return {
        "grey_fraction": float(((hi - lo) < 0.04).mean()),
        "white_fraction": float((lo > 0.92).mean()),
        "warm_fraction": float(((r >= g) & (r >= b)).mean()),
        "dark_fraction": float((hi < 0.1).mean()),
        "saturation": float(saturation.mean()),
        "saturation_spread": float(saturation.std()),
        "hue_x": float((weight * np.cos(hue)).sum() / total),
        "hue_y": float((weight * np.sin(hue)).sum() / total),
        "brightness": float(hi.mean()),
        "brightness_spread": float(hi.std()),
        "edges": float(edges.mean()),
        "colourfulness": float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())),
    }


def dermoscopy_check(image: Image.Image) -> ImageCheck:
    """Whether ``image`` has the colour make-up of a dermoscopy photo, with its :func:`image_statistics`.

    Dermoscopy shows skin filling the frame: reddish-brown hues dominate, few pixels are
    colourless and almost none are paper-white. The check cannot tell a lesion from other
    skin; it only catches inputs that are clearly something else, and says why.
    """
    stats = image_statistics(image)
    warm, grey, white = stats["warm_fraction"], stats["grey_fraction"], stats["white_fraction"]
    reasons = []
    if grey > MAX_GREY_FRACTION:
        reasons.append(f"it is almost colourless ({grey:.0%} grey pixels); dermoscopy is in colour")
    if white > MAX_WHITE_FRACTION:
        reasons.append(f"{white:.0%} of it is plain white, like a document or a screenshot")
    if warm < MIN_WARM_FRACTION and grey <= MAX_GREY_FRACTION:
        reasons.append(f"only {warm:.0%} of its pixels have skin-like (reddish) hues")
    return ImageCheck(not reasons, tuple(reasons), stats)


K = 10


# The share of validation dermoscopy (out of fold) above the threshold. Kept below the 1.5 % the test split may
# show: the distance score's threshold at 1 % of validation gave 1.6 % on test (docs/BENCHMARKS.md, before issue 24).
FALSE_ALARM = 0.005


MAX_REFERENCE = 2000  # training rows kept in the saved detector (about 5 MB): a random sample of the train split


# A detector file is its reference features (2000 × 1280 float16, about 5 MB) and a few numbers; a larger one is
# refused unread.
MAX_DETECTOR_BYTES = 64 * 2**20


# How many signals a reason names at most, and the smallest share of the score (in log-odds) one must add to be named.
MAX_NAMED = 3


MIN_NAMED_LOGIT = 1.0


def detector_path(checkpoint: str | Path) -> Path:
    """Where the detector of ``checkpoint`` is saved: beside it, ``NAME.unfamiliar.npz``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.unfamiliar.npz")


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def signal_rows(distances: np.ndarray, checks: Sequence[ImageCheck]) -> np.ndarray:
    """One row per image of the raw signals in :data:`SIGNALS` order: the log feature distance (an exact training
    image's 0 kept finite), then the image statistics."""
    stats = np.array([[c.statistics[name] for name in IMAGE_STATISTICS] for c in checks], np.float64)
    logs = np.log(np.maximum(np.asarray(distances, np.float64), 1e-6))
    return np.column_stack([logs, stats.reshape(len(logs), len(IMAGE_STATISTICS))])


def _array(key: str, rows: int | None = None, ndim: int = 1) -> Field:
    """A required field holding a finite float array of ``ndim`` dimensions (``rows`` long when given)."""

    def check(value: object) -> None:
        if not isinstance(value, np.ndarray) or value.ndim != ndim or value.dtype.kind != "f":
            raise SchemaError(f"{key} must be a {ndim}-dimensional array of numbers")
        if rows is not None and len(value) != rows:
            raise SchemaError(f"{key} must hold {rows} values, one per signal; it holds {len(value)}")
        if not np.isfinite(value).all():
            raise SchemaError(f"{key} holds a value that is not a finite number")

    return Field(True, check)


def _signal_names(value: object) -> None:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "U" or tuple(value.tolist()) != SIGNALS:
        raise SchemaError(
            f"signals must be {', '.join(SIGNALS)}: the file was fitted on other signals (bench/similar.py refits it)"
        )


def _scale(value: object) -> None:
    _array("scale", len(SIGNALS)).check(value)
    if not (np.asarray(value) > 0).all():
        raise SchemaError("scale must be positive for every signal")


DETECTOR_SCHEMA = {
    "reference": _array("reference", ndim=2),
    "k": Field(True, whole("k", 1, MAX_REFERENCE)),
    "checkpoint_sha1": Field(True, text("checkpoint_sha1")),
    "val_false_alarm": Field(True, probability("val_false_alarm")),
    "signals": Field(True, _signal_names),
    "centre": _array("centre", len(SIGNALS)),
    "scale": Field(True, _scale),
    "weights": _array("weights", 2 * len(SIGNALS)),
    "bias": Field(True, number("bias", -1e6, 1e6)),
    "threshold": Field(True, probability("threshold")),
}


@dataclass
class UnfamiliarDetector:
    """Unit training features (``reference``) and the neighbour rank ``k`` for the feature distance; the combined
    score's logistic regression over the standardised signals (``centre``, ``scale``: the median and spread of
    validation dermoscopy; ``weights`` for the signed then the unsigned standardised signals, ``bias``) and its
    ``threshold`` on the score, which ``val_false_alarm`` of validation dermoscopy exceeds."""

    reference: np.ndarray
    k: int
    centre: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    checkpoint_sha1: str = ""
    val_false_alarm: float = FALSE_ALARM

    def __post_init__(self) -> None:
        self._search = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(
            np.asarray(self.reference, np.float32)
        )

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``features`` (raw pooled features) to its ``k``-th nearest reference."""
        dist, _ = self._search.kneighbors(unit(np.atleast_2d(features)))
        # Euclidean distance d between unit vectors is sqrt(2 - 2 cos): cosine distance is d² / 2.
        return dist[:, -1] ** 2 / 2

    def contributions(self, signals: np.ndarray) -> np.ndarray:
        """Each signal's share of the score's log-odds (rows of :func:`signal_rows`), signed and unsigned parts
        together."""
        z = (np.atleast_2d(signals) - self.centre) / self.scale
        n = len(SIGNALS)
        return z * self.weights[:n] + np.abs(z) * self.weights[n:]

    def scores(self, signals: np.ndarray) -> np.ndarray:
        """The combined score of each row of :func:`signal_rows`: from 0 (like validation dermoscopy) to 1 (like
        the non-dermoscopic pictures), the regression's probability with both classes weighted equally."""
        return expit(self.contributions(signals).sum(axis=1) + self.bias)

    def image_scores(self, features: np.ndarray, checks: Sequence[ImageCheck]) -> np.ndarray:
        """The combined score of images given their pooled features and :func:`dermoscopy_check` results."""
        return self.scores(signal_rows(self.distances(features), checks))

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            reference=self.reference.astype(np.float16),
            k=self.k,
            checkpoint_sha1=self.checkpoint_sha1,
            val_false_alarm=self.val_false_alarm,
            signals=np.array(SIGNALS),
            centre=self.centre,
            scale=self.scale,
            weights=self.weights,
            bias=self.bias,
            threshold=self.threshold,
        )

    @classmethod
    def load(cls, path: str | Path) -> UnfamiliarDetector:
        """The detector saved in ``path``; :class:`SchemaError` naming what is wrong with a file that is not one
        (not a NumPy archive, a field missing, unknown or out of bounds, fitted on other signals)."""
        path = Path(path)
        kind = "an unfamiliar-image detector"
        if path.stat().st_size > MAX_DETECTOR_BYTES:
            raise SchemaError(f"{path.name} is larger than {kind} can be ({format_bytes(MAX_DETECTOR_BYTES)} at most)")
        try:  # no pickles: an object array is refused (ValueError)
            blob = np.load(path, allow_pickle=False)
            if not isinstance(blob, np.lib.npyio.NpzFile):  # a bare .npy is one array
                raise ValueError("one array, not an archive of fields")
            with blob:
                payload = {key: blob[key] for key in blob.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SchemaError(f"{path.name} is not {kind} (not a NumPy archive of its fields: {exc})") from None
        scalars = ("k", "checkpoint_sha1", "val_false_alarm", "bias", "threshold")
        payload = {key: value.item() if key in scalars and value.ndim == 0 else value for key, value in payload.items()}
        try:
            check_schema(payload, DETECTOR_SCHEMA, kind)
            if payload["k"] > len(payload["reference"]):
                raise SchemaError(f"k is {payload['k']} but reference holds {len(payload['reference'])} images")
        except ValueError as exc:
            raise SchemaError(f"{path.name} is not {kind}: {exc}") from None
        return cls(
            reference=payload["reference"].astype(np.float32),
            k=payload["k"],
            centre=payload["centre"].astype(np.float64),
            scale=payload["scale"].astype(np.float64),
            weights=payload["weights"].astype(np.float64),
            bias=float(payload["bias"]),
            threshold=float(payload["threshold"]),
            checkpoint_sha1=payload["checkpoint_sha1"],
            val_false_alarm=float(payload["val_false_alarm"]),
        )


def fit_detector(
    train: np.ndarray,
    val: np.ndarray,
    val_checks: Sequence[ImageCheck],
    unfamiliar: np.ndarray,
    unfamiliar_checks: Sequence[ImageCheck],
    *,
    k: int = K,
    false_alarm: float = FALSE_ALARM,
    max_reference: int = MAX_REFERENCE,
    seed: int = 0,
    checkpoint_sha1: str = "",
) -> UnfamiliarDetector:
    """A detector over (at most ``max_reference`` randomly kept) ``train`` features, its combined score fitted on
    the validation dermoscopy (``val`` features and their :func:`dermoscopy_check` results) against non-dermoscopic
    pictures (``unfamiliar``, likewise), its threshold the ``1 - false_alarm`` quantile of the validation images'
    out-of-fold scores (5 folds), so that the quantile is not taken on images the regression was fitted on."""
    reference = unit(train)
    if len(reference) > max_reference:
        keep = np.random.default_rng(seed).choice(len(reference), max_reference, replace=False)
        reference = reference[np.sort(keep)]
    n = len(SIGNALS)
    detector = UnfamiliarDetector(
        reference, k, np.zeros(n), np.ones(n), np.zeros(2 * n), 0.0, 1.0, checkpoint_sha1, false_alarm
    )
    derm = signal_rows(detector.distances(val), val_checks)
    other = signal_rows(detector.distances(unfamiliar), unfamiliar_checks)
    detector.centre = np.median(derm, axis=0)
    detector.scale = np.maximum(derm.std(axis=0), 1e-6)
    z = (np.r_[derm, other] - detector.centre) / detector.scale
    x, y = np.c_[z, np.abs(z)], np.r_[np.zeros(len(derm)), np.ones(len(other))]
    regression = LogisticRegression(class_weight="balanced", max_iter=5000)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    held_out = cross_val_predict(regression, x, y, cv=folds, method="decision_function")
    regression.fit(x, y)
    detector.weights, detector.bias = regression.coef_[0].astype(np.float64), float(regression.intercept_[0])
    detector.threshold = float(expit(np.quantile(held_out[: len(derm)], 1 - false_alarm)))
    return detector


def load_detector(checkpoint: str | Path) -> UnfamiliarDetector | None:
    """The detector saved for ``checkpoint``; None when there is none, it was fitted on another version of the file,
    or it is damaged (logged): then the colour heuristic is all the app has, and Diagnose says so."""
    path = detector_path(checkpoint)
    if not path.is_file():
        return None
    try:
        detector = UnfamiliarDetector.load(path)
    except (OSError, SchemaError) as exc:
        logging.getLogger(__name__).warning("unfamiliar-image detector refused: %s", exc)
        return None
    return detector if detector.checkpoint_sha1 == file_digest(checkpoint) else None


@dataclass(frozen=True)
class UnfamiliarCheck:
    """Whether to warn, and why in words. ``score``/``threshold`` are None without a fitted detector."""

    unfamiliar: bool
    reasons: tuple[str, ...]
    score: float | None
    threshold: float | None
    colour: ImageCheck

    @property
    def measured(self) -> bool:
        return self.threshold is not None


def _named_signals(detector: UnfamiliarDetector, signals: np.ndarray) -> list[str]:
    """The signals that add most to a flagged image's score, each with its value beside typical dermoscopy's."""
    shares = detector.contributions(signals)[0]
    named = []
    for i in np.argsort(-shares)[:MAX_NAMED]:
        if shares[i] < MIN_NAMED_LOGIT:
            break
        name = SIGNALS[i]
        side = "higher" if signals[i] > detector.centre[i] else "lower"
        if name == "distance":
            value, typical = np.exp(signals[i]), np.exp(detector.centre[i])
            named.append(
                f"its features are {'farther from' if side == 'higher' else 'closer to'} the model's training images "
                f"(distance {value:.3f} to its {detector.k}th-nearest; typical dermoscopy: {typical:.3f})"
            )
        else:
            label, fmt = IMAGE_STATISTICS[name]
            value, typical = fmt.format(signals[i]), fmt.format(detector.centre[i])
            named.append(f"{label} {value}, {side} than in typical dermoscopy ({typical})")
    return named


def check_unfamiliar(
    image: Image.Image, embedding: np.ndarray | None, detector: UnfamiliarDetector | None
) -> UnfamiliarCheck:
    """The combined score decides when a detector is fitted, the colour heuristic otherwise; a flagged image's
    reasons name the signals that weighed most, then the colour findings."""
    colour = dermoscopy_check(image)
    if detector is None or embedding is None:
        return UnfamiliarCheck(not colour.looks_dermoscopic, colour.reasons, None, None, colour)
    signals = signal_rows(detector.distances(embedding), [colour])
    score, threshold = float(detector.scores(signals)[0]), detector.threshold
    if score <= threshold:
        return UnfamiliarCheck(False, (), score, threshold, colour)
    measured = (
        f"its unfamiliar-image score is {score:.2f} (feature distance, colour and texture combined; the warning "
        f"starts at {threshold:.2f}, which {detector.val_false_alarm:.1%} of real dermoscopy reaches)"
    )
    return UnfamiliarCheck(
        True, (measured, *_named_signals(detector, signals[0]), *colour.reasons), score, threshold, colour
    )
