"""The "unfamiliar image" warning: is an upload like the dermoscopy the model learnt from?

The score is the cosine distance from the image's pooled features to its ``k``-th nearest training image
(Sun et al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022): an image unlike every
training image is far from all of them, whatever its predicted class. The detector is fitted on the training
split's features and its threshold is the validation split's ``1 - false_alarm`` quantile, so about that share
of real dermoscopy is flagged; ``bench/similar.py`` measures it on the test split against non-dermoscopic
images (``tests/data/unfamiliar``) and saves it beside the checkpoint (``NAME.unfamiliar.npz``).

With a detector the score alone decides: on the reference model the colour heuristic of
:func:`core.inference.unfamiliar.dermoscopy_check` flags 1.6 % of test dermoscopy by itself and adds few detections, so
"either one" would double the false alarms past the 2 % target (docs/BENCHMARKS.md). Its findings (grey, white, not
reddish) still describe a flagged image in words. Without a detector the colour heuristic is all there is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from core.inference.similar import unit

# Calibrated on 3000 HAM10000 images: 1 % have fewer warm pixels than this, none are mostly grey or white.
MIN_WARM_FRACTION = 0.25


MAX_GREY_FRACTION = 0.7


MAX_WHITE_FRACTION = 0.4


@dataclass(frozen=True)
class ImageCheck:
    looks_dermoscopic: bool
    reasons: tuple[str, ...]
    warm_fraction: float
    grey_fraction: float
    white_fraction: float


def dermoscopy_check(image: Image.Image) -> ImageCheck:
    """Whether ``image`` has the colour make-up of a dermoscopy photo.

    Dermoscopy shows skin filling the frame: reddish-brown hues dominate, few pixels are
    colourless and almost none are paper-white. The check cannot tell a lesion from other
    skin; it only catches inputs that are clearly something else, and says why.
    """
    small = np.asarray(image.convert("RGB").resize((64, 48), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    hi, lo = small.max(axis=-1), small.min(axis=-1)
    warm = float(((r >= g) & (r >= b)).mean())
    grey = float(((hi - lo) < 0.04).mean())
    white = float((lo > 0.92).mean())
    reasons = []
    if grey > MAX_GREY_FRACTION:
        reasons.append(f"it is almost colourless ({grey:.0%} grey pixels); dermoscopy is in colour")
    if white > MAX_WHITE_FRACTION:
        reasons.append(f"{white:.0%} of it is plain white, like a document or a screenshot")
    if warm < MIN_WARM_FRACTION and grey <= MAX_GREY_FRACTION:
        reasons.append(f"only {warm:.0%} of its pixels have skin-like (reddish) hues")
    return ImageCheck(not reasons, tuple(reasons), warm, grey, white)


K = 10


FALSE_ALARM = 0.01  # the share of validation dermoscopy above the threshold


MAX_REFERENCE = 2000  # training rows kept in the saved detector (about 5 MB): a random sample of the train split


def detector_path(checkpoint: str | Path) -> Path:
    """Where the detector of ``checkpoint`` is saved: beside it, ``NAME.unfamiliar.npz``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.unfamiliar.npz")


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


@dataclass
class UnfamiliarDetector:
    """Unit training features (``reference``), the neighbour rank ``k`` and the distance ``threshold``."""

    reference: np.ndarray
    k: int
    threshold: float
    checkpoint_sha1: str = ""
    val_false_alarm: float = FALSE_ALARM

    def __post_init__(self) -> None:
        self._search = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(
            np.asarray(self.reference, np.float32)
        )

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``features`` (raw pooled features) to its ``k``-th nearest reference."""
        dist, _ = self._search.kneighbors(unit(np.atleast_2d(features)))
        # Euclidean distance d between unit vectors is sqrt(2 - 2 cos): cosine distance is d² / 2.
        return dist[:, -1] ** 2 / 2

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path,
            reference=self.reference.astype(np.float16),
            k=self.k,
            threshold=self.threshold,
            checkpoint_sha1=self.checkpoint_sha1,
            val_false_alarm=self.val_false_alarm,
        )

    @classmethod
    def load(cls, path: str | Path) -> UnfamiliarDetector:
        with np.load(path) as blob:
            return cls(
                reference=blob["reference"].astype(np.float32),
                k=int(blob["k"]),
                threshold=float(blob["threshold"]),
                checkpoint_sha1=str(blob["checkpoint_sha1"]),
                val_false_alarm=float(blob["val_false_alarm"]),
            )


def fit_detector(
    train: np.ndarray,
    val: np.ndarray,
    *,
    k: int = K,
    false_alarm: float = FALSE_ALARM,
    max_reference: int = MAX_REFERENCE,
    seed: int = 0,
    checkpoint_sha1: str = "",
) -> UnfamiliarDetector:
    """A detector over (at most ``max_reference`` randomly kept) training features, its threshold the
    ``1 - false_alarm`` quantile of the validation features' scores."""
    reference = unit(train)
    if len(reference) > max_reference:
        keep = np.random.default_rng(seed).choice(len(reference), max_reference, replace=False)
        reference = reference[np.sort(keep)]
    detector = UnfamiliarDetector(reference, k, threshold=np.inf, checkpoint_sha1=checkpoint_sha1)
    detector.threshold = float(np.quantile(detector.scores(val), 1 - false_alarm))
    detector.val_false_alarm = false_alarm
    return detector


def load_detector(checkpoint: str | Path) -> UnfamiliarDetector | None:
    """The detector saved for ``checkpoint``, or None when there is none or it was fitted on another version."""
    path = detector_path(checkpoint)
    if not path.is_file():
        return None
    try:
        detector = UnfamiliarDetector.load(path)
    except (OSError, ValueError, KeyError):
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


def check_unfamiliar(
    image: Image.Image, embedding: np.ndarray | None, detector: UnfamiliarDetector | None
) -> UnfamiliarCheck:
    """The feature score decides when a detector is fitted, the colour heuristic otherwise; the colour findings
    are among the reasons whenever the image is flagged."""
    colour = dermoscopy_check(image)
    if detector is None or embedding is None:
        return UnfamiliarCheck(not colour.looks_dermoscopic, colour.reasons, None, None, colour)
    score, threshold = float(detector.scores(embedding)[0]), detector.threshold
    if score <= threshold:
        return UnfamiliarCheck(False, (), score, threshold, colour)
    measured = (
        f"its features are farther from the model's training images than those of "
        f"{1 - detector.val_false_alarm:.0%} of real dermoscopy (distance {score:.3f} to its "
        f"{detector.k}th-nearest training image; the warning starts at {threshold:.3f})"
    )
    return UnfamiliarCheck(True, (measured, *colour.reasons), score, threshold, colour)
