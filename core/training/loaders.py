"""The data a run trains on: the lesion-grouped split checked, and the batches of each input pipeline."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.common.labels import CLASSES
from core.common.runs import (
    RunLog,
)
from core.common.runtime import default_workers
from core.data.augment import DeviceBatches, batch_transform
from core.data.dataset import DatasetError, DatasetIndex, LesionDataset, index_dataset
from core.data.decoded import CacheUnavailable, DecodedImages, open_decoded
from core.data.preprocessing import (
    eval_transform,
    train_transform,
)
from core.data.splits import SPLITS, split_by_lesion
from core.inference.features import FeatureBatches, FeatureCache, backbone_key
from core.models.architectures import LesionNet
from core.training import distributed, imbalance
from core.training.config import METADATA_NEEDS_DECODED, TrainConfig


def make_sampler(cfg: TrainConfig, labels: np.ndarray, generator: torch.Generator) -> torch.utils.data.Sampler | None:
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
    frame = frame.assign(split=split_by_lesion(frame, cfg.split_fractions, cfg.split_seed).to_numpy())
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
        key = (cfg.data, cfg.max_images, cfg.seed, cfg.split_fractions, cfg.split_seed)
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


def _loaders(
    cfg: TrainConfig,
    model: LesionNet,
    frame: pd.DataFrame,
    train_rows: pd.DataFrame,
    device: torch.device,
    log: RunLog,
    generator: torch.Generator,
    shared: SharedInputs,
    should_stop: Callable[[], bool],
):
    """Training and evaluation loaders, the module they feed (the head on cached features in head-only
    mode, as batches sliced from the features in memory, on the device; the whole network otherwise), and
    the images that computing the features found damaged: they have no features, so they are left out of
    every split. With the decoded-image cache (``input_pipeline="decoded"``) batches come from it, augmented
    on the device, and the images it could not decode are left out the same way. On the JPEG path the loaders'
    datasets set damaged images aside as they meet them (see :class:`LesionDataset` and :func:`damaged_images`)."""
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    prep = cfg.preprocessing
    eval_bs = max(cfg.batch_size, 64)
    sampler = make_sampler(cfg, train_rows["label"].to_numpy(), generator)
    drop_last = len(train_rows) > cfg.batch_size
    sampler, batch_size = distributed.shard(sampler, len(train_rows), cfg.batch_size, generator, drop_last)
    if cfg.uses_feature_cache:
        paths = frame["path"].tolist()

        started = time.time()
        # Rank 0 computes (or loads) the features and hands them to the others: one writer of the cache. Its
        # images come from the decoded-image cache with that pipeline (opened, or built, by rank 0 alone too).
        feats, damaged = distributed.from_main(
            lambda: shared.features(
                cfg,
                model.backbone,
                paths,
                device=device,
                batch_size=eval_bs,
                num_workers=workers,
                progress=lambda done, total: log.phase("features", done, total, started),
                should_stop=should_stop,
                decoded=partial(shared.decoded, cfg, log, should_stop) if cfg.input_pipeline == "decoded" else None,
            )
        )
        decoded = frame[~frame["path"].isin(damaged)]
        if damaged:
            check_splits(decoded)
        row_of = {p: i for i, p in enumerate(decoded["path"])}
        encoding = model.metadata_encoding
        # A head that takes metadata trains on [features | encoded metadata] (core.models.metadata.MetadataHead).
        inputs = feats if encoding is None else model.head.join(feats, encoding.encode_frame(decoded))

        def batches(rows: pd.DataFrame, batch_size: int, **order) -> FeatureBatches:
            rows = rows[~rows["path"].isin(damaged)]
            idx = torch.as_tensor([row_of[p] for p in rows["path"]], dtype=torch.long)
            labels = torch.tensor(rows["label"].to_numpy())
            return FeatureBatches(inputs[idx].to(device), labels.to(device), batch_size, **order)

        train_loader = batches(
            train_rows,
            batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=drop_last,
        )
        eval_loaders = {s: batches(frame[frame["split"] == s], eval_bs) for s in ("val", "test")}
        return model.head, train_loader, eval_loaders, damaged
    cache = None
    if cfg.input_pipeline == "decoded":
        # Rank 0 builds the cache (asking for a stop as it goes; from_main hands the stop to every rank) and the
        # others open it once it is there: two processes writing one folder would spoil each other's files.
        if distributed.from_main(lambda: shared.decoded(cfg, log, should_stop) is not None):
            cache = shared.decoded(cfg, log)
    if cache is not None:
        damaged = sorted(set(cache.damaged).intersection(frame["path"]))
        if damaged:
            check_splits(frame[~frame["path"].isin(damaged)])

        encoding = model.metadata_encoding

        def device_batches(rows: pd.DataFrame, batch_size: int, augmentation: str, **order) -> DeviceBatches:
            usable = rows[~rows["path"].isin(damaged)]
            cache_rows = torch.from_numpy(cache.rows(usable["path"].tolist()))
            if encoding is not None:
                order["metadata"] = torch.as_tensor(encoding.encode_frame(usable), dtype=torch.float32)
            # The cache rows are drawn in batches as a DataLoader with the run's sampler would draw images.
            batches = FeatureBatches(cache_rows, torch.tensor(usable["label"].to_numpy()), batch_size, **order)
            transform = batch_transform(prep, augmentation, cache.size)
            return DeviceBatches(cache, batches, transform, device, channels_last=cfg.channels_last)

        train_loader = device_batches(
            train_rows,
            batch_size,
            cfg.augmentation,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=drop_last,
        )
        eval_loaders = {s: device_batches(frame[frame["split"] == s], eval_bs, "none") for s in ("val", "test")}
        return model, train_loader, eval_loaders, damaged
    if model.metadata_encoding is not None:
        raise ValueError(METADATA_NEEDS_DECODED)
    train_ds = LesionDataset.from_frame(train_rows, train_transform(prep, cfg.augmentation), prep, skip_damaged=True)
    # The collate function leaves damaged images out of their batch; any of the run's datasets' will do,
    # as it only needs the input size they share.
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "collate_fn": train_ds.collate,
    }
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last,
        **options,
    )
    eval_loaders = {
        s: torch.utils.data.DataLoader(
            LesionDataset.from_frame(frame[frame["split"] == s], eval_transform(prep), prep, skip_damaged=True),
            batch_size=eval_bs,
            **options,
        )
        for s in ("val", "test")
    }
    return model, train_loader, eval_loaders, []


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
