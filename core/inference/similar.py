"""Similar confirmed cases: the dataset's images nearest to an upload in the model's own feature space.

Content-based retrieval with a classifier's pooled features was as accurate as its softmax in Tschandl et al.
(JAMA Dermatology 2019), and it shows the user cases with a confirmed diagnosis instead of a bare number.

The index holds the pooled backbone features of every image of a dataset, computed once per model and dataset
through :class:`core.inference.features.FeatureCache`: the cache is keyed by the checkpoint's content and each image's
path, size and modification time, so a changed model or a changed image is recomputed and nothing else is.

Which images may be offered: the model's own train and validation images (its split record, as the Quiz
finds it). Its test images are never neighbours when the model is being measured (:func:`knn_vote` on the test
split), and the Diagnose page leaves them out too unless the user asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import NearestNeighbors

from core.common.background import BackgroundTask
from core.common.labels import CLASSES, CONFIRMATION, DISPLAY_NAMES, NUM_CLASSES
from core.common.settings import cache_dir as default_cache_dir
from core.data.preprocessing import Preprocessing
from core.data.splits import model_split, split_column
from core.inference.features import FeatureCache, ProgressFn, backbone_key
from core.models.ensemble_file import lead_model

NEIGHBOURS = 8
# The splits whose images may be shown as similar cases: the model learnt from them or was selected on them.
REFERENCE_SPLITS = ("train", "val")


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that a dot product is the cosine similarity."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Case:
    """One neighbour: a dataset image with its confirmed diagnosis and its similarity to the query."""

    image_id: str
    path: str
    dx: str
    dx_type: str
    age: float | None
    sex: str
    localization: str
    split: str
    similarity: float  # cosine similarity of the pooled features, in [0, 1] for ReLU features

    @property
    def diagnosis(self) -> str:
        return DISPLAY_NAMES[self.dx]

    @property
    def confirmed_by(self) -> str:
        return CONFIRMATION.get(self.dx_type, self.dx_type or "unknown")

    def patient(self) -> str:
        """Age, sex and site in words, leaving out what the metadata does not know."""
        bits = []
        if self.age is not None:
            bits.append(f"{self.age:.0f} years")
        if self.sex and self.sex != "unknown":
            bits.append(self.sex)
        if self.localization and self.localization != "unknown":
            bits.append(self.localization)
        return ", ".join(bits) or "no patient details"

    def caption(self) -> str:
        """One line for a thumbnail: diagnosis, how it was confirmed, the patient, the similarity."""
        return (
            f"{self.diagnosis} ({self.dx}) · confirmed by {self.confirmed_by} · {self.patient()} · "
            f"similarity {self.similarity:.2f} · {self.image_id}"
        )


@dataclass
class CaseIndex:
    """A dataset's images that decoded (``frame``: image_id, dx, dx_type, age, sex, localization, path, split)
    and their pooled features (``features``, one row each, raw; ``unit_features`` normalised)."""

    frame: pd.DataFrame
    features: np.ndarray

    def __post_init__(self) -> None:
        self.unit_features = unit(self.features)

    def rows(self, splits: Sequence[str] | None) -> np.ndarray:
        """Row numbers of the images in ``splits`` (all images when None)."""
        if splits is None:
            return np.arange(len(self.frame))
        return np.flatnonzero(self.frame["split"].isin(list(splits)).to_numpy())

    def _case(self, row: int, similarity: float) -> Case:
        r = self.frame.iloc[row]
        age = r.get("age")
        return Case(
            image_id=str(r["image_id"]),
            path=str(r["path"]),
            dx=str(r["dx"]),
            dx_type=str(r.get("dx_type") or ""),
            age=None if age is None or pd.isna(age) else float(age),
            sex=str(r.get("sex") or ""),
            localization=str(r.get("localization") or ""),
            split=str(r["split"]),
            similarity=float(similarity),
        )

    def nearest(
        self, embedding: np.ndarray, k: int = NEIGHBOURS, splits: Sequence[str] | None = REFERENCE_SPLITS
    ) -> list[Case]:
        """The ``k`` images of ``splits`` most similar to ``embedding`` (one pooled feature vector), nearest first."""
        rows = self.rows(splits)
        sims = self.unit_features[rows] @ unit(embedding.reshape(1, -1))[0]
        order = np.argsort(-sims, kind="stable")[:k]
        return [self._case(int(rows[i]), sims[i]) for i in order]

    def nearest_by_class(
        self, embedding: np.ndarray, splits: Sequence[str] | None = REFERENCE_SPLITS
    ) -> dict[str, Case | None]:
        """The nearest image of each class (None for a class ``splits`` has no image of), in ``CLASSES`` order."""
        rows = self.rows(splits)
        sims = self.unit_features[rows] @ unit(embedding.reshape(1, -1))[0]
        dx = self.frame["dx"].to_numpy()[rows]
        out: dict[str, Case | None] = {}
        for code in CLASSES:
            mine = np.flatnonzero(dx == code)
            out[code] = None if len(mine) == 0 else self._case(int(rows[mine[sims[mine].argmax()]]), sims[mine].max())
        return out


def vote(cases: Sequence[Case]) -> np.ndarray:
    """The share of ``cases`` of each class, in ``CLASSES`` order: the neighbours' vote."""
    counts = np.zeros(NUM_CLASSES)
    for case in cases:
        counts[CLASSES.index(case.dx)] += 1
    return counts / max(len(cases), 1)


def neighbours_disagree(shares: np.ndarray, answer: np.ndarray | int) -> np.ndarray:
    """Whether the nearest confirmed cases' most common diagnosis is another class than the model's ``answer`` (a
    class index, or one per row): ``shares`` is their vote (:func:`vote`, or rows of :func:`knn_vote`). A tie that
    includes the answer agrees. One bool per row."""
    shares = np.atleast_2d(shares)
    answer = np.broadcast_to(np.asarray(answer), len(shares))
    return shares[np.arange(len(shares)), answer] < shares.max(axis=1)


def disagreement_text(top_class: str, cases: Sequence[Case]) -> str | None:
    """What Diagnose says beside the answer when the nearest confirmed ``cases`` mostly hold another diagnosis
    (:func:`neighbours_disagree`); None when they agree or there are none."""
    shares = vote(cases)
    if not cases or not neighbours_disagree(shares, CLASSES.index(top_class))[0]:
        return None
    ranked = sorted(zip(shares, CLASSES, strict=True), reverse=True)
    counts = ", ".join(f"{round(p * len(cases))} {DISPLAY_NAMES[c]} ({c})" for p, c in ranked if p)
    return (
        f"Its {len(cases)} nearest confirmed cases disagree with it: {counts}. The model's answer and the cases most "
        "like this image point different ways; look at the cases below and treat the answer as uncertain."
    )


def knn_vote(
    reference: np.ndarray, reference_labels: np.ndarray, queries: np.ndarray, k: int = NEIGHBOURS
) -> np.ndarray:
    """(n, 7) class shares among each query's ``k`` nearest reference rows by cosine similarity.

    The reference rows must not include the queries' own split: on the test split, pass train (and val) only.
    """
    search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(unit(reference))
    _, idx = search.kneighbors(unit(queries))
    labels = np.asarray(reference_labels)[idx]
    return np.stack([(labels == c).mean(axis=1) for c in range(NUM_CLASSES)], axis=1)


def index_key(checkpoint: str | Path, prep: Preprocessing, arch: str) -> str:
    """The feature cache's key for a checkpoint: its architecture, content and preprocessing."""
    return backbone_key(arch, str(checkpoint), prep)


def build_index(
    checkpoint: str | Path,
    frame: pd.DataFrame,
    split: pd.Series,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> CaseIndex:
    """Features of every image of ``frame`` (a dataset index's frame) under ``checkpoint``'s backbone (an
    ensemble's first member's: see :mod:`core.inference.ensemble`).

    ``split`` is each row's split for this model (aligned with ``frame``; NaN where unknown, such images are
    kept but belong to no split). The cache is ``cache_dir``, by default :func:`core.common.settings.cache_dir`.
    Only images not in the cache are computed, with ``progress(done, total)``.
    The model is loaded here, apart from any shared :class:`core.inference.predictor.Predictor`, so that building an
    index never holds up predictions. Images that cannot be decoded are left out.
    """
    model, ckpt = lead_model(checkpoint)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    paths = frame["path"].astype(str).tolist()
    features, damaged = FeatureCache(cache_dir or default_cache_dir() / "features").features(
        model.backbone,
        index_key(checkpoint, prep, model.arch),
        paths,
        prep,
        device=torch.device(device),
        progress=progress,
    )
    keep = ~frame["path"].astype(str).isin(set(damaged)).to_numpy()
    columns = [c for c in ("image_id", "dx", "dx_type", "age", "sex", "localization", "path") if c in frame]
    table = frame.loc[keep, columns].assign(split=np.asarray(split)[keep]).reset_index(drop=True)
    return CaseIndex(table, features.numpy())


def index_in_background(
    checkpoint: str | Path,
    checkpoint_dict: dict,
    frame: pd.DataFrame,
    run_folders: Sequence[Path],
    *,
    cache_dir: str | Path | None = None,
) -> BackgroundTask[CaseIndex]:
    """:func:`build_index` of ``frame`` under ``checkpoint`` (``checkpoint_dict``, its loaded dict), each image with
    its split for the model (:func:`core.data.splits.model_split` over ``run_folders``), started in a background
    thread: the Diagnose page shows its answer and report while it runs, and its bar reads the task's stage, count,
    rate and ETA. A :class:`core.data.splits.SplitError` (no split of the model can be trusted) ends it as the
    task's error."""

    def work(task: BackgroundTask[CaseIndex]) -> CaseIndex:
        record = model_split(checkpoint, checkpoint_dict, frame, run_folders)
        task.stage = "loading the model and the features cached earlier"
        split = split_column(frame, record.split_of)

        def progress(done: int, total: int) -> None:
            task.stage = "computing the features of each image"
            task.progress(done, total)

        return build_index(checkpoint, frame, split, cache_dir=cache_dir, progress=progress)

    return BackgroundTask(work, stage="finding the images this model trained on")
