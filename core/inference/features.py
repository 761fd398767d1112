"""Backbone features computed once and cached on disk, for head-only training and similar cases.

With a frozen backbone the features of an image never change, so recomputing
them every epoch wastes almost all of the training time. The cache is keyed by
the image file (path, size, modification time), the backbone's weights and the
preprocessing, so a changed file or model never reuses stale features.

Augmentation in this mode: features are computed from the un-augmented
(evaluation) transform, so cached head-only training sees no augmentation.
Train with ``feature_cache=False`` to run the backbone on augmented images every
epoch instead (the seed pipeline's original, much slower behaviour).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Sampler

from core.common.runs import StopRequested
from core.common.runtime import tune_allocator
from core.data.augment import eval_batches
from core.data.dataset import LesionDataset
from core.data.decoded import DecodedImages
from core.data.preprocessing import Preprocessing, eval_transform
from core.models.checkpoints import atomic_save
from core.models.torchfile import outline

ProgressFn = Callable[[int, int], None]


def backbone_key(arch: str, weights: str, prep: Preprocessing) -> str:
    """Identify a backbone's weights and preprocessing; a weights file is identified by its content."""
    ident = weights
    if weights not in ("imagenet", "none"):
        ident = hashlib.sha1(Path(weights).read_bytes()).hexdigest()
    text = json.dumps({"arch": arch, "weights": ident, "prep": prep.to_dict()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def image_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


@torch.inference_mode()
def compute_features(
    backbone: nn.Module,
    paths: Sequence[str],
    prep: Preprocessing,
    *,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    channels_last: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    decoded: DecodedImages | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Run ``backbone`` (eval mode) over the images at ``paths``: read from the ``decoded`` image cache when
    given (it must hold them), else decoded from their files.

    Returns float32 [N, D] features on the CPU, one row per image that decoded, in the order of
    ``paths``, and the paths of the images that did not (set aside as :class:`LesionDataset` explains).
    ``should_stop`` is asked after every batch: when it says so, the images done so far are returned (their
    features and damaged paths together cover the first ones of ``paths``).
    """
    tune_allocator()
    backbone.eval().to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if decoded is not None:
        images = _decoded_pass(decoded, paths, prep, batch_size, device)
    else:
        images = _file_pass(paths, prep, batch_size, num_workers, device)
    out, done = [], 0
    for (batch, _), done in zip(images.batches, images.ends, strict=False):
        batch = batch.to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = backbone(batch)
        out.append(feats.float().cpu())
        if progress:
            progress(done, len(paths))
        if should_stop is not None and done < len(paths) and should_stop():
            break
    else:
        done = len(paths)  # also when every image was damaged: no batch at all
    return (torch.cat(out) if out else torch.empty(0)), images.damaged(done)


class _Pass(NamedTuple):
    """One pass of :func:`compute_features` over ``paths``, from the decoded-image cache or from the files. The
    two meet damaged images differently, so each says how far a batch goes and which images it set aside."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images, placeholder labels)
    ends: list[int]  # after batch k, the first ends[k] of the paths are done, damaged ones included
    damaged: Callable[[int], list[str]]  # the damaged images among the first ``done`` paths


def _decoded_pass(
    decoded: DecodedImages, paths: Sequence[str], prep: Preprocessing, batch_size: int, device: torch.device
) -> _Pass:
    """The cache knows its damaged images before the pass: they are left out of the batches, so a batch ends
    further along ``paths`` than its size."""
    unusable = set(decoded.damaged).intersection(paths)
    usable = [p for p in paths if p not in unusable]
    batches = eval_batches(decoded, usable, [0] * len(usable), prep, batch_size, device, channels_last=False)
    # How many of ``paths`` each batch completes: its images and the damaged ones before the next batch's.
    position = {p: i for i, p in enumerate(paths)}
    ends = [position[usable[end - 1]] + 1 for end in range(batch_size, len(usable), batch_size)]
    ends.append(len(paths))
    return _Pass(batches, ends, lambda done: [p for p in paths[:done] if p in unusable])


def _file_pass(
    paths: Sequence[str], prep: Preprocessing, batch_size: int, num_workers: int, device: torch.device
) -> _Pass:
    """Decoding the files meets damaged images only as it reads them: each batch covers its ``batch_size`` paths
    (the collate function leaves the damaged ones out), and the dataset remembers those it met."""
    dataset = LesionDataset(paths, [0] * len(paths), eval_transform(prep), prep, skip_damaged=True)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=dataset.collate,
    )
    ends = [min(end, len(paths)) for end in range(batch_size, len(paths) + batch_size, batch_size)]
    return _Pass(loader, ends, lambda done: dataset.damaged_paths())


@torch.inference_mode()
def feature_width(backbone: nn.Module, prep: Preprocessing, device: torch.device) -> int:
    """How many features ``backbone`` gives an image: one pass over one blank input."""
    backbone.eval().to(device)
    return int(backbone(torch.zeros(1, 3, *prep.input_size, device=device)).shape[1])


def read_features(file: Path, key: str, width: int) -> dict[str, torch.Tensor]:
    """The features cached in ``file`` by image key, when it is what :class:`FeatureCache` writes for backbone
    ``key``: outlined before it is loaded (:func:`core.models.torchfile.outline`), its own key, unique image keys,
    and one finite float32 row of ``width`` per image. Anything else reads as empty, so every image is computed
    again (with progress) and the file rewritten: a cache is read, not trusted."""
    try:
        outline(file)
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — a damaged or foreign cache only costs a recomputation
        return {}
    if not isinstance(blob, dict) or set(blob) != {"key", "keys", "features"} or blob["key"] != key:
        return {}
    keys, features = blob["keys"], blob["features"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        return {}
    if not (
        isinstance(features, torch.Tensor)
        and features.dtype == torch.float32
        and tuple(features.shape) == (len(keys), width)
        and bool(torch.isfinite(features).all())
    ):
        return {}
    return dict(zip(keys, features, strict=True))


class FeatureCache:
    """One file per backbone key holding the features of every image seen so far."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def path(self, key: str) -> Path:
        """The file holding the features computed by backbone ``key`` (see :func:`backbone_key`)."""
        return self.dir / f"{key}.pt"

    def features(
        self,
        backbone: nn.Module,
        key: str,
        paths: Sequence[str],
        prep: Preprocessing,
        *,
        device: torch.device,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
        decoded: Callable[[], DecodedImages | None] | None = None,
    ) -> tuple[torch.Tensor, list[str]]:
        """Features for ``paths`` in order, computing only those not cached yet, and the paths of the images
        that could not be decoded: they have no row, and are not cached, so a repaired file is tried again.
        The images come from the decoded-image cache that ``decoded()`` opens, asked only when some features
        are missing; from their files when it gives None.
        When ``should_stop`` says so between two batches, the features computed so far are cached and
        :class:`StopRequested` is raised: the next run starts where this one stopped."""
        file = self.path(key)
        stored = read_features(file, key, feature_width(backbone, prep, device)) if file.is_file() else {}
        keys = [image_key(p) for p in paths]
        missing = [i for i, k in enumerate(keys) if k not in stored]
        damaged: list[str] = []
        if missing:
            fresh, damaged = compute_features(
                backbone,
                [paths[i] for i in missing],
                prep,
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                should_stop=should_stop,
                decoded=decoded() if decoded is not None else None,
            )
            finished = len(fresh) + len(damaged)  # the first images of ``missing``, decoded or not
            unusable = set(damaged)
            decoded = [i for i in missing[:finished] if paths[i] not in unusable]
            stored.update({keys[i]: f for i, f in zip(decoded, fresh, strict=True)})
            all_keys = list(stored)
            if all_keys:
                features = torch.stack([stored[k] for k in all_keys])
                atomic_save({"key": key, "keys": all_keys, "features": features}, file)
            if finished < len(missing):
                raise StopRequested(f"stopped after computing the features of {finished} of {len(missing)} images")
        elif progress:
            progress(len(paths), len(paths))
        rows = [stored[k] for k in keys if k in stored]
        return (torch.stack(rows) if rows else torch.empty(0)), damaged


class FeatureBatches:
    """Batches of in-memory features and their labels, what the head trains and is evaluated on; with
    ``metadata`` (one encoded row per sample, :mod:`core.models.metadata`) each batch also holds its rows.

    A DataLoader over a TensorDataset indexes and collates one sample at a time; slicing a whole batch out
    of the tensors is one operation. The batches, and the random numbers drawn for them, are those of
    ``DataLoader(TensorDataset(features, labels), batch_size, shuffle=shuffle, sampler=sampler,
    generator=generator, drop_last=drop_last)`` with a ``generator``, so a seed gives the numbers it gave
    before this class existed.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        metadata: torch.Tensor | None = None,
    ):
        self.features, self.labels, self.metadata = features, labels, metadata
        self.batch_size, self.shuffle, self.sampler = batch_size, shuffle, sampler
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # A DataLoader draws its workers' base seed from the generator before the first index.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        elif self.shuffle:
            order = torch.randperm(len(self.labels), generator=self.generator)
        else:
            order = torch.arange(len(self.labels))
        order = order.to(self.features.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if self.metadata is None:
                yield self.features[batch], self.labels[batch]
            else:
                yield self.features[batch], self.labels[batch], self.metadata[batch]
