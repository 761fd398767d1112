"""The data a run trains on: the lesion-grouped split, checked, and the batches of each input pipeline.

:func:`build_loaders` picks one builder per input pipeline: :func:`head_on_cached_features` (a frozen backbone's
features, computed once), :func:`network_on_decoded_images` (the decoded-image cache, augmented on the device) and
:func:`network_on_jpeg_files` (PIL in DataLoader workers). All three draw the training batches in one order
(:func:`training_draw`) and leave the images they cannot decode out of their batches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Sampler

from core.common.labels import CLASSES
from core.common.runs import RunLog
from core.common.runtime import default_workers
from core.data.augment import DeviceBatches, batch_transform
from core.data.dataset import DatasetError, DatasetIndex, LesionDataset, index_dataset
from core.data.decoded import CacheUnavailable, DecodedImages, open_decoded
from core.data.preprocessing import eval_transform, train_transform
from core.data.splits import SPLITS, split_by_lesion
from core.inference.features import FeatureBatches, FeatureCache, backbone_key
from core.models.architectures import LesionNet
from core.training import distributed, imbalance
from core.training.config import METADATA_NEEDS_DECODED, TrainConfig


def make_sampler(cfg: TrainConfig, labels: np.ndarray, generator: torch.Generator) -> Sampler | None:
    """The imbalance strategy's training sampler (None: a plain shuffle), drawing from ``generator`` so that the
    per-epoch seed fixes the order."""
    return imbalance.get(cfg.imbalance).sampler(labels, generator)


def split_dataset(cfg: TrainConfig, index: DatasetIndex | None = None) -> pd.DataFrame:
    """The indexed images (optionally subsampled) with their split. ``index`` is ``cfg.data`` indexed
    already; raises :class:`DatasetError` for data a run cannot learn from (:func:`check_classes`,
    :func:`check_splits`)."""
    frame = (index or index_dataset(cfg.data)).frame
    if cfg.max_images and cfg.max_images < len(frame):
        # Stratified subsample: keeps rare classes present (at least two images each) in small experiments.
        fraction = cfg.max_images / len(frame)
        parts = [
            group.sample(max(2, round(len(group) * fraction)), random_state=cfg.seed) if len(group) > 2 else group
            for _, group in frame.groupby("dx", sort=True)
        ]
        frame = pd.concat(parts).reset_index(drop=True)
    check_classes(frame)
    split = split_by_lesion(frame, cfg.split_fractions, cfg.split_seed, cfg.holdout_source).to_numpy()
    # Holding out a source leaves the other views of its lesions in no split: they are not the run's images.
    frame = frame.assign(split=split)[pd.notna(split)].reset_index(drop=True)
    check_splits(frame)
    return frame


def prepare_data(cfg: TrainConfig, frame: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split images (``frame``, or :func:`split_dataset`'s) and the training rows after the imbalance
    strategy's resampling (oversampling duplicates rows)."""
    frame = split_dataset(cfg) if frame is None else frame
    train = imbalance.get(cfg.imbalance).resample_rows(frame[frame["split"] == "train"], cfg.seed)
    return frame, train


def _classes_text(dx: pd.Series) -> str:
    return ", ".join(f"{code}: {n} images" for code, n in dx.value_counts().items())


def check_classes(frame: pd.DataFrame) -> None:
    """Refuse images of fewer than two classes, or fewer lesions than splits: a classifier trained on one
    class learns nothing, yet scores a perfect balanced accuracy on a test split of that class."""
    if frame["dx"].nunique() < 2:
        raise DatasetError(
            f"The dataset has images of one class only ({_classes_text(frame['dx'])}); a classifier needs "
            f"images of at least two of {', '.join(CLASSES)}. Check the metadata's dx column, or point --data "
            "at the whole dataset."
        )
    lesions = frame["lesion_id"].nunique()
    if lesions < len(SPLITS):
        raise DatasetError(
            f"The dataset has {lesions} lesion{'s' if lesions != 1 else ''}; the training, validation and test "
            "splits need at least one each (all images of a lesion go to one split). Add images."
        )


def check_splits(frame: pd.DataFrame) -> None:
    """Refuse a split with no images, or with images of one class only: the model would be trained,
    selected, calibrated or tested on nothing, and balanced accuracy on one class reads 1.000."""
    for split, name in zip(SPLITS, ("training", "validation", "test"), strict=True):
        dx = frame.loc[frame["split"] == split, "dx"]
        if dx.empty:
            raise DatasetError(
                f"The {name} split has no images. Give every split a share of the lesions "
                "(--split-fractions), or add images."
            )
        if dx.nunique() < 2:
            raise DatasetError(
                f"The {name} split holds images of one class only ({_classes_text(dx)}); it needs at least "
                "two classes. Add images of the rarer classes, or give the split a larger share "
                "(--split-fractions)."
            )


class SharedInputs:
    """What the runs of one process share: the split dataset and the backbone features, each made once for
    every distinct setting. The imbalance experiment's runs differ only in their strategy, so they index,
    split and load (or compute) features once."""

    def __init__(self) -> None:
        self._indexes: dict[str, DatasetIndex] = {}
        self._frames: dict[tuple, pd.DataFrame] = {}
        self._features: dict[tuple, tuple[torch.Tensor, list[str]]] = {}
        self._decoded: dict[tuple, DecodedImages | None] = {}

    def index(self, cfg: TrainConfig) -> DatasetIndex:
        if cfg.data not in self._indexes:
            self._indexes[cfg.data] = index_dataset(cfg.data)
        return self._indexes[cfg.data]

    def frame(self, cfg: TrainConfig) -> pd.DataFrame:
        key = (cfg.data, cfg.max_images, cfg.seed, cfg.split_fractions, cfg.split_seed, cfg.holdout_source)
        if key not in self._frames:
            self._frames[key] = split_dataset(cfg, self.index(cfg))
        return self._frames[key]

    def features(
        self, cfg: TrainConfig, backbone: nn.Module, paths: list[str], **options: Any
    ) -> tuple[torch.Tensor, list[str]]:
        """:meth:`core.inference.features.FeatureCache.features` for ``cfg``'s backbone (the features and the damaged
        images' paths), memoised for this process."""
        prep = cfg.preprocessing
        key = backbone_key(cfg.arch, cfg.weights, prep)
        memo = (cfg.cache_dir, key, tuple(paths))
        if memo not in self._features:
            self._features[memo] = FeatureCache(cfg.cache_dir).features(backbone, key, paths, prep, **options)
        elif options.get("progress"):
            options["progress"](len(paths), len(paths))
        return self._features[memo]

    def decoded(
        self, cfg: TrainConfig, log: RunLog, should_stop: Callable[[], bool] | None = None
    ) -> DecodedImages | None:
        """The decoded-image cache of ``cfg``'s whole dataset (:func:`core.data.decoded.open_decoded`), built with
        its progress in ``log``, memoised for this process; None, said in the log and on stderr, when it
        cannot be stored: the run reads the JPEG files instead. ``should_stop`` is asked as it decodes."""
        memo = (cfg.decoded_dir, cfg.data, cfg.preprocessing)
        if memo in self._decoded:
            return self._decoded[memo]

        started = time.time()

        def report(done: int, total: int) -> None:
            log.phase("decoding", done, total, started)

        try:
            cache = open_decoded(
                self.index(cfg).frame["path"].tolist(),
                cfg.preprocessing,
                root=cfg.data,
                cache_dir=cfg.decoded_dir,
                progress=report,
                should_stop=should_stop,
            )
        except CacheUnavailable as exc:
            message = f"{exc}; reading the JPEG files instead (input pipeline jpeg)"
            log.event("input_pipeline", pipeline="jpeg", reason=message)
            print(f"note: {message}", file=sys.stderr, flush=True)
            cache = None
        self._decoded[memo] = cache
        return cache


EVAL_SPLITS = ("val", "test")

# What each input pipeline yields: (inputs, labels) or (inputs, labels, encoded metadata) batches, with a length.
Batches = FeatureBatches | DeviceBatches | torch.utils.data.DataLoader


class RunLoaders(NamedTuple):
    """What :func:`build_loaders` hands the training loop. A named tuple, so it also unpacks in this order."""

    module: nn.Module  # what trains: the whole network, or its head alone on cached features
    train: Batches
    evaluation: dict[str, Batches]  # by split, "val" and "test"
    damaged: list[str]  # images found undecodable while building the batches: they are in no split's batches


@dataclass(frozen=True)
class TrainingDraw:
    """How the training batches are drawn: the sampler (or a shuffle) and the batch size of this process."""

    batch_size: int
    sampler: Sampler | None
    generator: torch.Generator
    drop_last: bool

    def order(self) -> dict[str, Any]:
        """The keyword arguments that make a DataLoader, or :class:`FeatureBatches` (which draws as one does),
        draw this order."""
        return {
            "shuffle": self.sampler is None,
            "sampler": self.sampler,
            "generator": self.generator,
            "drop_last": self.drop_last,
        }


def training_draw(cfg: TrainConfig, train_rows: pd.DataFrame, generator: torch.Generator) -> TrainingDraw:
    """One draw for every pipeline, so that a seed picks the same images whichever pipeline reads them. Under
    torchrun each process draws its own share of every batch (:func:`core.training.distributed.shard`)."""
    sampler = make_sampler(cfg, train_rows["label"].to_numpy(), generator)
    # A training split smaller than one batch still gets its one (short) batch.
    drop_last = len(train_rows) > cfg.batch_size
    sampler, batch_size = distributed.shard(sampler, len(train_rows), cfg.batch_size, generator, drop_last)
    return TrainingDraw(batch_size, sampler, generator, drop_last)


def eval_batch_size(cfg: TrainConfig) -> int:
    """At least 64: evaluation keeps no activations for a backward pass, so larger batches fit, and go faster."""
    return max(cfg.batch_size, 64)


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """``cfg.num_workers``, or the number that suits ``device`` (:func:`core.common.runtime.default_workers`)."""
    return cfg.num_workers if cfg.num_workers is not None else default_workers(device)


@dataclass(frozen=True)
class RunData:
    """What every input pipeline builds a run's batches from."""

    cfg: TrainConfig
    model: LesionNet
    frame: pd.DataFrame  # the split dataset
    train_rows: pd.DataFrame  # its training rows after resampling (prepare_data)
    draw: TrainingDraw
    device: torch.device


def build_loaders(
    cfg: TrainConfig,
    model: LesionNet,
    frame: pd.DataFrame,
    train_rows: pd.DataFrame,
    device: torch.device,
    log: RunLog,
    generator: torch.Generator,
    shared: SharedInputs,
    should_stop: Callable[[], bool],
) -> RunLoaders:
    """The batches a run trains and is evaluated on, from the input pipeline its config asks for: cached
    backbone features for a frozen backbone, else the decoded-image cache, else (not asked for, or no room on
    the disk for it) the JPEG files. ``frame`` is the split dataset, ``train_rows`` its training rows after
    resampling (:func:`prepare_data`); ``should_stop`` is asked while features are computed or images decoded,
    which may end here with :class:`core.common.runs.StopRequested`."""
    run = RunData(cfg, model, frame, train_rows, training_draw(cfg, train_rows, generator), device)
    if cfg.uses_feature_cache:
        return head_on_cached_features(run, log, shared, should_stop)
    cache = open_decoded_cache(cfg, log, shared, should_stop) if cfg.input_pipeline == "decoded" else None
    if cache is not None:
        return network_on_decoded_images(run, cache)
    return network_on_jpeg_files(run)


def head_on_cached_features(
    run: RunData, log: RunLog, shared: SharedInputs, should_stop: Callable[[], bool]
) -> RunLoaders:
    """Head-only training. A frozen backbone gives an image the same features every epoch, so they are computed
    once (and kept on disk for later runs) and the head trains on batches sliced from them on the device: an
    epoch then costs a few milliseconds, at the price of no augmentation. The images the backbone could not read
    have no features, so they are left out of every split, which must still hold two classes."""
    cfg, model, frame, device = run.cfg, run.model, run.frame, run.device
    feats, damaged = backbone_features(cfg, model, frame, device, log, shared, should_stop)
    usable = frame[~frame["path"].isin(damaged)]
    if damaged:
        check_splits(usable)
    row_of = {p: i for i, p in enumerate(usable["path"])}
    encoding = model.metadata_encoding
    # A head that takes metadata trains on [features | encoded metadata] (core.models.metadata.MetadataHead).
    inputs = feats if encoding is None else model.head.join(feats, encoding.encode_frame(usable))

    def batches(rows: pd.DataFrame, batch_size: int, **order: Any) -> FeatureBatches:
        rows = rows[~rows["path"].isin(damaged)]
        idx = torch.as_tensor([row_of[p] for p in rows["path"]], dtype=torch.long)
        labels = torch.tensor(rows["label"].to_numpy())
        return FeatureBatches(inputs[idx].to(device), labels.to(device), batch_size, **order)

    train = batches(run.train_rows, run.draw.batch_size, **run.draw.order())
    evaluation = {s: batches(frame[frame["split"] == s], eval_batch_size(cfg)) for s in EVAL_SPLITS}
    return RunLoaders(model.head, train, evaluation, damaged)


def backbone_features(
    cfg: TrainConfig,
    model: LesionNet,
    frame: pd.DataFrame,
    device: torch.device,
    log: RunLog,
    shared: SharedInputs,
    should_stop: Callable[[], bool],
) -> tuple[torch.Tensor, list[str]]:
    """The features of ``frame``'s images, in order, and the images that could not be read. Rank 0 alone computes
    (or loads) them and hands them to the others, so the feature cache has one writer; with the decoded pipeline
    its images come from the decoded-image cache, which rank 0 alone opens (or builds) too."""
    paths = frame["path"].tolist()
    started = time.time()
    return distributed.from_main(
        lambda: shared.features(
            cfg,
            model.backbone,
            paths,
            device=device,
            batch_size=eval_batch_size(cfg),
            num_workers=loader_workers(cfg, device),
            progress=lambda done, total: log.phase("features", done, total, started),
            should_stop=should_stop,
            decoded=partial(shared.decoded, cfg, log, should_stop) if cfg.input_pipeline == "decoded" else None,
        )
    )


def open_decoded_cache(
    cfg: TrainConfig, log: RunLog, shared: SharedInputs, should_stop: Callable[[], bool]
) -> DecodedImages | None:
    """The decoded-image cache of the run's dataset, or None when the disk has no room for it. Rank 0 builds it
    (asking for a stop as it goes; ``from_main`` hands the stop to every rank) and the others open it once it is
    there: two processes writing one folder would spoil each other's files."""
    if distributed.from_main(lambda: shared.decoded(cfg, log, should_stop) is not None):
        return shared.decoded(cfg, log)
    return None


def network_on_decoded_images(run: RunData, cache: DecodedImages) -> RunLoaders:
    """Fine-tuning (or a head trained without the feature cache) from the decoded-image cache. The images were
    decoded and resized once, so a batch is a gather from a memory map, augmented on the device a whole batch at a
    time rather than image by image in worker processes: the CPU stops being what a step waits for. The images
    the cache could not decode are left out of every split, which must still hold two classes."""
    cfg, model, frame = run.cfg, run.model, run.frame
    damaged = sorted(set(cache.damaged).intersection(frame["path"]))
    if damaged:
        check_splits(frame[~frame["path"].isin(damaged)])
    encoding = model.metadata_encoding

    def batches(
        rows: pd.DataFrame, batch_size: int, augmentation: str, jpeg_quality: int, **order: Any
    ) -> DeviceBatches:
        usable = rows[~rows["path"].isin(damaged)]
        cache_rows = torch.from_numpy(cache.rows(usable["path"].tolist()))
        if encoding is not None:
            order["metadata"] = torch.as_tensor(encoding.encode_frame(usable), dtype=torch.float32)
        # The cache rows are drawn in batches as a DataLoader with the run's sampler would draw images.
        drawn = FeatureBatches(cache_rows, torch.tensor(usable["label"].to_numpy()), batch_size, **order)
        transform = batch_transform(cfg.preprocessing, augmentation, cache.size, jpeg_quality)
        return DeviceBatches(cache, drawn, transform, run.device, channels_last=cfg.channels_last)

    train = batches(run.train_rows, run.draw.batch_size, cfg.augmentation, cfg.jpeg_quality, **run.draw.order())
    evaluation = {s: batches(frame[frame["split"] == s], eval_batch_size(cfg), "none", 0) for s in EVAL_SPLITS}
    return RunLoaders(model, train, evaluation, damaged)


def network_on_jpeg_files(run: RunData) -> RunLoaders:
    """Fine-tuning (or a head trained without the feature cache) from the JPEG files, each decoded and augmented
    by PIL in DataLoader workers: it needs no room on the disk, which is why the decoded pipeline falls back to
    it. Damaged images are met only as the loaders read them, so none is known yet: the datasets set them aside
    (:class:`LesionDataset`) and :func:`damaged_images` collects them."""
    cfg, frame, device = run.cfg, run.frame, run.device
    if run.model.metadata_encoding is not None:
        raise ValueError(METADATA_NEEDS_DECODED)  # these batches carry no metadata
    prep = cfg.preprocessing
    workers = loader_workers(cfg, device)
    train_ds = LesionDataset.from_frame(
        run.train_rows, train_transform(prep, cfg.augmentation, cfg.jpeg_quality), prep, skip_damaged=True
    )
    # The collate function leaves damaged images out of their batch; any of the run's datasets' will do,
    # as it only needs the input size they share.
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "collate_fn": train_ds.collate,
    }
    train = torch.utils.data.DataLoader(train_ds, batch_size=run.draw.batch_size, **run.draw.order(), **options)
    evaluation = {
        s: torch.utils.data.DataLoader(
            LesionDataset.from_frame(frame[frame["split"] == s], eval_transform(prep), prep, skip_damaged=True),
            batch_size=eval_batch_size(cfg),
            **options,
        )
        for s in EVAL_SPLITS
    }
    return RunLoaders(run.model, train, evaluation, [])


def damaged_images(loaders: Iterable, found: Iterable[str] = ()) -> list[str]:
    """Every image set aside so far because it could not be decoded: ``found`` (by the feature cache) and
    those the loaders' :class:`LesionDataset` flagged, sorted. Batches of cached features have no dataset."""
    flagged = {
        path
        for loader in loaders
        if isinstance(getattr(loader, "dataset", None), LesionDataset)
        for path in loader.dataset.damaged_paths()
    }
    return sorted(flagged.union(found))
