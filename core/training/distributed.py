"""Training on several GPUs or machines: torchrun's processes joined by DistributedDataParallel.

torchrun starts one process per GPU and tells each its place in environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, the rendezvous address); :func:`init` joins them into a process group,
NCCL for CUDA tensors and Gloo for CPU ones. Outside torchrun every helper here is the single-process
identity: rank 0 of 1, the sampler, loss and model unchanged.

A run under torchrun is the single-process run of the same config, spread out:

- ``batch_size`` stays the global batch; each process takes an equal share of it (:func:`rank_batch_size`);
- every process draws the same global order of training rows, from the run's generator seeded alike
  everywhere (shuffled, or the imbalance strategy's sampler), and takes its slice of every batch
  (:class:`ShardedOrder`), so oversampling and the weighted sampler draw exactly as they would in one process;
- a step's loss is the whole global batch's mean (:class:`GlobalMean`: a weighted loss divides by the weight
  of all the processes' targets, not its own), and DDP averages the gradients;
- on CUDA, BatchNorm layers that train become SyncBatchNorm, so their statistics are those of the global batch.

Rank 0 alone writes: the run folder, its logs and checkpoints, the feature cache. Every process must see the
dataset and the runs folder at the same path (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler, Sampler

from core.common.runs import RunLog

T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join torchrun's process group (once); nothing outside torchrun."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"  # control messages stay on the CPU: no device syncs for a stop flag
    else:
        backend = "gloo"
    dist.init_process_group(backend)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the run (rank 0)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This process's own GPU (``LOCAL_RANK``) when the run is on CUDA under torchrun; ``device`` otherwise."""
    if world_size() > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def agree(flag: bool) -> bool:
    """True on every process when it is true on any: a STOP file seen by one ends the step everywhere,
    rather than leaving the others waiting for its gradients."""
    if world_size() == 1:
        return flag
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def barrier() -> None:
    """Wait for every process; a CPU all-reduce, so a long wait is bounded by Gloo's timeout, not NCCL's."""
    agree(False)


def from_main(make: Callable[[], T]) -> T:
    """``make()`` called on rank 0 only, its result (picklable) given to every process. What it raises is
    raised on every process: a stop that ends rank 0's feature extraction (:class:`core.common.runs.StopRequested`)
    ends the run everywhere, rather than leaving the others waiting here for a result while rank 0 moves on
    to its next collective. ``make`` itself must call no collective: the others are not in it."""
    if world_size() == 1:
        return make()
    box: list = [None]
    failure = None
    if is_main():
        try:
            box = [(make(), None)]
        except Exception as exc:
            failure = exc
            try:
                pickle.dumps(exc)
                box = [(None, exc)]
            except Exception:  # the others get its type's name and message
                box = [(None, RuntimeError(f"{type(exc).__name__}: {exc}"))]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    result, error = box[0]
    if error is not None:
        raise error
    return result


def rank_batch_size(batch_size: int) -> int:
    """Each process's share of the global ``batch_size``."""
    world = world_size()
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must divide evenly among the {world} processes"
        )
    return batch_size // world


class ShardedOrder(Sampler[int]):
    """This process's share of a global order of training rows, batch by batch.

    ``order`` draws the global order (all processes draw the same one: their generators are seeded alike),
    cut into global batches of ``batch_size`` as one process would; of each, this rank takes its consecutive
    ``batch_size // world`` rows. A DataLoader with that per-rank batch size then gives each process its part
    of each global batch, and every process the same number of steps. With ``drop_last`` false the order is
    at most one global batch (the trainer drops the last partial batch otherwise), shared out as evenly as it goes.
    """

    def __init__(self, order: Sampler[int], batch_size: int, rank: int, world: int, drop_last: bool):
        self.order, self.batch_size, self.rank, self.world, self.drop_last = order, batch_size, rank, world, drop_last
        self.per_rank = batch_size // world

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        full = len(order) // self.batch_size
        for step in range(full):
            start = step * self.batch_size + self.rank * self.per_rank
            yield from order[start : start + self.per_rank]
        tail = order[full * self.batch_size :]
        if tail and not self.drop_last:
            yield from np.array_split(np.asarray(tail), self.world)[self.rank].tolist()

    def __len__(self) -> int:
        n = len(self.order)
        full = n // self.batch_size
        tail = n - full * self.batch_size
        share = 0 if self.drop_last or not tail else len(np.array_split(np.arange(tail), self.world)[self.rank])
        return full * self.per_rank + share


def shard(
    sampler: Sampler | None, rows: int, batch_size: int, generator: torch.Generator, drop_last: bool
) -> tuple[Sampler | None, int]:
    """The training sampler and batch size for this process: ``(sampler, batch_size)`` unchanged in one
    process; under torchrun, :class:`ShardedOrder` over the sampler (or the shuffle the loader would have
    drawn from ``generator``) and the per-process batch size."""
    world = world_size()
    if world == 1:
        return sampler, batch_size
    if rows < world:
        raise ValueError(f"the training split has {rows} images, too few to share among {world} processes")
    order = sampler if sampler is not None else RandomSampler(range(rows), generator=generator)
    return ShardedOrder(order, batch_size, rank(), world, drop_last), rank_batch_size(batch_size)


class GlobalMean(nn.Module):
    """A mean-reduced loss rescaled so that DDP's average of the processes' gradients is the gradient of the
    global batch's mean.

    A loss averages over its process's targets: by their count, or by their summed class weights for a
    weighted cross-entropy. Multiplying it by that divisor gives the process's sum; dividing by the divisor of
    the whole global batch (summed over processes on the device, without a wait for the host) and multiplying
    by the number of processes (DDP divides by it) makes the averaged gradients exactly those of one process
    on the whole batch, whatever the class mix of each share.
    """

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, targets)
        weight = getattr(self.criterion, "weight", None)
        local = weight[targets].sum() if weight is not None else torch.tensor(float(len(targets)), device=loss.device)
        total = local.detach().clone()
        dist.all_reduce(total)
        return loss * local * world_size() / total


def global_mean(criterion: nn.Module) -> nn.Module:
    """``criterion`` as :class:`GlobalMean` under torchrun; itself in one process."""
    return GlobalMean(criterion) if world_size() > 1 else criterion


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun (its BatchNorm layers synchronised on CUDA);
    itself in one process. The checkpoint is written from the unwrapped module (:func:`unwrap`)."""
    if world_size() == 1:
        return module
    if device.type == "cuda":
        # In place: the layers keep their parameters, so the optimizer built on them still holds the right ones.
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def combine_epoch(stats: dict) -> dict:
    """An epoch's training numbers over all processes: the mean loss and accuracy (the processes saw equal
    shares), images/s summed, the slowest process's seconds."""
    world = world_size()
    if world == 1:
        return stats
    summed = torch.tensor([stats["train_loss"], stats["train_acc"], stats["images_per_s"]], dtype=torch.float64)
    slowest = torch.tensor(stats["seconds"], dtype=torch.float64)
    dist.all_reduce(summed)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss, acc, rate = summed.tolist()
    return {
        **stats,
        "train_loss": loss / world,
        "train_acc": acc / world,
        "images_per_s": rate,
        "seconds": float(slowest),
    }


class QuietRunLog(RunLog):
    """The run log of a process other than rank 0: it says when progress is due (the trainer reads its
    running loss then) but writes nothing."""

    def begin(self) -> None:
        pass

    def truncate_to_epoch(self, epoch: int) -> None:
        pass

    def event(self, event: str, **data) -> None:
        pass

    def status(self, state: str, error: str | None = None) -> None:
        pass


def run_log(run_dir) -> RunLog:
    """The run's log: rank 0's writes the run folder, the others' nothing."""
    return RunLog(run_dir) if is_main() else QuietRunLog(run_dir)
