"""The trainer's loop, in the style of torchvision's classification reference: explicit functions, the config
passed in. A run goes down through :func:`train` (the run folder and its log), which runs :func:`_run` (data, model,
loaders, optimiser, resumed state), which runs :func:`train_epochs` (each epoch: :func:`train_one_epoch`, whose
every step is :func:`train_step`, then validation and :func:`save_checkpoints`) and then :func:`finalize`
(calibration and the test evaluation). Checkpointing (:func:`read_resume_point`, :func:`restore`,
:func:`save_checkpoints`) is kept apart from the epoch loop. The config is :mod:`core.training.config`'s, the
batches :mod:`core.training.loaders`'.

What a run folder holds is described in :mod:`core.common.runs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from core.common.runs import (
    STOP_FILE,
    RunLog,
    StopRequested,
    check_run_name,
    default_run_name,
    write_config,
    write_dataset_report,
    write_evaluation,
    write_split,
)
from core.common.runtime import compile_problem, pick_device, torch_threads, tune_allocator
from core.data.dataset import DatasetIndex
from core.inference.forward import predict_logits
from core.metrics.calibration import fit_temperature, softmax
from core.metrics.classification import compute_metrics, operating_point_fields
from core.models.architectures import LesionNet, build_model, train_mode
from core.models.checkpoints import atomic_save, checkpoint_dict, read_checkpoint
from core.models.metadata import new_spec
from core.training import distributed, imbalance
from core.training.config import TrainConfig
from core.training.loaders import Batches, RunLoaders, SharedInputs, build_loaders, damaged_images, prepare_data


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray) -> nn.Module:
    return imbalance.get(cfg.imbalance).loss(train_labels, cfg)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # On CUDA a step of the per-tensor (foreach) update launches hundreds of small kernels; the fused one launches
    # a few. Measured on an H100, MobileNetV2 at batch 32: 34 -> 24 ms per training step (docs/BENCHMARKS.md).
    fused = bool(params) and all(p.is_cuda for p in params)
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch, so warm-up and cosine decay are smooth; StepLR keeps its per-epoch meaning.
    ``onecycle`` is PyTorch's OneCycleLR to the peak ``lr`` (its own warm-up, so ``warmup_epochs`` is unused)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(1, total))
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        if cfg.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new folder in ``cfg.out``; ValueError for a name that would leave it, before anything is created."""
    name = check_run_name(cfg.name) if cfg.name else default_run_name(cfg.to_dict(), Path(cfg.out))
    run_dir = Path(cfg.out) / name
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run; resume it or choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train_one_epoch(
    model: nn.Module,
    loader: Batches,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    epoch: int,
    cfg: TrainConfig,
    log: RunLog,
    should_stop: Callable[[], bool],
) -> dict:
    """One pass over the training data, with a progress line in ``log`` now and then; ends early after the step
    at which ``should_stop()`` says so. ``model`` is the whole network, or only the head on cached features."""
    set_train_mode(model)
    totals, start, steps = EpochTotals(), time.perf_counter(), len(loader)
    for step, batch in enumerate(loader, 1):
        size = len(batch[1])
        if not size:
            continue  # every image of the batch was damaged (LesionDataset.collate left them out)
        totals.add(train_step(model, batch, criterion, optimizer, scheduler, device, cfg), size)
        if step == steps or log.progress_due():
            log_progress(log, totals, start, epoch=epoch, step=step, steps=steps)
        if should_stop():
            break
    totals.settle()
    elapsed = time.perf_counter() - start
    return {
        "train_loss": totals.loss / max(totals.seen, 1),
        "train_acc": totals.correct / max(totals.seen, 1),
        "images_per_s": _per_second(totals.seen, elapsed),
        "seconds": elapsed,
    }


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except for a network's frozen BatchNorm layers (:func:`core.models.architectures.train_mode`):
    updating their statistics would change the frozen backbone."""
    if isinstance(distributed.unwrap(model), LesionNet):
        train_mode(distributed.unwrap(model))
    else:
        model.train()


def train_step(
    model: nn.Module,
    batch: Sequence[torch.Tensor],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: TrainConfig,
) -> torch.Tensor:
    """One optimisation step on ``batch``: inputs, labels and, for a network that takes metadata, the encoded
    rows. Returns the batch's mean loss and its number of correct predictions, stacked and left on the device
    (see :class:`EpochTotals`)."""
    inputs, targets, *metadata = batch
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    metadata = [m.to(device, non_blocking=True) for m in metadata]
    if cfg.channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        logits = model(inputs, *metadata)
        loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return torch.stack((loss.detach().float(), (logits.argmax(1) == targets).sum().float()))


class EpochTotals:
    """An epoch's training loss and correct predictions, summed over its steps. Each step's numbers stay on the
    device until :meth:`settle` reads them all at once: reading them every step would make the host wait for the
    device at every step."""

    def __init__(self) -> None:
        self.loss, self.correct, self.seen = 0.0, 0, 0
        self._pending: list[tuple[torch.Tensor, int]] = []

    def add(self, loss_and_correct: torch.Tensor, images: int) -> None:
        self._pending.append((loss_and_correct, images))
        self.seen += images

    def settle(self) -> None:
        """Add the pending steps' numbers, read from the device at once, to the totals. The sums are those of
        reading each step's loss on its own."""
        if self._pending:
            values = torch.stack([v for v, _ in self._pending]).tolist()
            for (loss, right), (_, n) in zip(values, self._pending, strict=True):
                self.loss += loss * n
                self.correct += int(right)
            self._pending.clear()


def log_progress(log: RunLog, totals: EpochTotals, start: float, *, epoch: int, step: int, steps: int) -> None:
    """A progress line: the epoch's mean loss so far, its speed and the time left."""
    totals.settle()  # before the clock is read: it waits for the device, whose work the speed must include
    elapsed = time.perf_counter() - start
    log.progress(
        force=True,
        epoch=epoch,
        step=step,
        steps=steps,
        loss=totals.loss / totals.seen,
        images_per_s=_per_second(totals.seen, elapsed),
        eta_s=(steps - step) * elapsed / step,
    )


def _per_second(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def collect_logits(
    model: nn.Module, loader, device: torch.device, cfg: TrainConfig, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core.inference.forward.predict_logits` under the run's autocast setting."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        return predict_logits(model, loader, device, progress)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """The validation numbers logged every epoch, one of which (``cfg.select_metric``) picks ``best.pt``."""
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    return {
        "val_loss": loss,
        "val_acc": float((pred == labels).mean()),
        "val_balanced_acc": float(balanced_accuracy_score(labels, pred)),
    }


def refuse_early(cfg: TrainConfig) -> None:
    """Refuse, before any writing, a global batch the processes cannot share and a compile this machine cannot
    do (ValueError)."""
    distributed.rank_batch_size(cfg.batch_size)
    if cfg.compile:
        problem = compile_problem(distributed.local_device(pick_device(cfg.device)))
        if problem:
            raise ValueError(f"torch.compile cannot compile on this machine ({problem}); train without --compile")


def train(
    cfg: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    shared: SharedInputs | None = None,
) -> Path:
    """Train according to ``cfg`` and return the run folder.

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt``.
    ``should_stop`` (and a ``STOP`` file in the run folder) end training after
    the current step; the best model so far is still evaluated and saved.
    ``shared`` holds the split dataset and features of earlier runs in this process (see :func:`train_many`).
    """
    tune_allocator()
    refuse_early(cfg)
    run_dir = Path(run_dir) if run_dir else distributed.from_main(lambda: new_run_dir(cfg))
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    log = distributed.run_log(run_dir)
    log.begin()
    try:
        state = _run(cfg, run_dir, log, resume, should_stop or (lambda: False), shared or SharedInputs())
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        log.event("end", status="failed", error=message)
        log.status("failed", message)
        raise
    log.event("end", status=state)
    log.status(state)
    distributed.barrier()  # the next run, or the end of the process, waits for rank 0's evaluation
    return run_dir


def train_many(
    configs: Sequence[TrainConfig],
    *,
    should_stop: Callable[[], bool] | None = None,
    on_run_start: Callable[[Path], None] | None = None,
    on_run_end: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Train ``configs`` one after another in this process and return their run folders.

    The runs share the process's start-up, the dataset index and split and the backbone features wherever
    their settings agree; each writes its own run folder, with the numbers it would have on its own. A run
    ended by a ``STOP`` file (also one created just after it finished) or ``should_stop`` ends the sequence:
    the configs after it do not start. So does an error, raised once the failed run has recorded it.
    ``on_run_start`` and ``on_run_end`` are called with each run's folder as it starts and ends.
    """
    for cfg in configs:
        refuse_early(cfg)  # before the first run folder, as train() does
        shared = SharedInputs()
    run_dirs = []
    for cfg in configs:
        run_dir = distributed.from_main(partial(new_run_dir, cfg))
        if on_run_start is not None:
            on_run_start(run_dir)
        train(cfg, run_dir=run_dir, should_stop=should_stop, shared=shared)
        run_dirs.append(run_dir)
        if on_run_end is not None:
            on_run_end(run_dir)
        if distributed.agree((run_dir / STOP_FILE).exists() or (should_stop is not None and should_stop())):
            break
    return run_dirs


def _run(
    cfg: TrainConfig, run_dir: Path, log: RunLog, resume: bool, should_stop: Callable[[], bool], shared: SharedInputs
) -> str:
    """The steps of a run, in order: data, model, loaders, optimisation, resumed state, epochs, evaluation.
    Returns how it ended, "finished" or "stopped". Rank 0 alone writes the run folder."""
    device = distributed.local_device(pick_device(cfg.device))
    main = distributed.is_main()
    if main:
        write_config(run_dir, cfg.to_dict())
    local_stop, stop = stop_checks(run_dir, should_stop)
    last = read_resume_point(run_dir, resume, log)

    index = shared.index(cfg)
    frame, train_rows = prepare_data(cfg, shared.frame(cfg))
    if main:
        write_split(run_dir, frame)
    validation = {**index.report.to_dict(), "ok": index.report.ok, "summary": index.report.summary()}

    model = make_model(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Only rank 0 computes the features, so it alone checks for a stop between their batches: a collective
    # there would wait for processes that never reach it. Its StopRequested reaches every process
    # (distributed.from_main), so all of them stop here.
    try:
        loaders = build_loaders(cfg, model, frame, train_rows, device, log, generator, shared, local_stop)
    except StopRequested:  # computing the features (kept in their cache) or decoding the images took the stop
        return "stopped"
    if cfg.compile:
        # What trains, the head alone on cached features. In place: the module, its state dict and its
        # checkpoints stay as they are.
        loaders.module.compile()

    def record_set_aside() -> None:
        # Rewritten after every epoch: the JPEG pipeline meets damaged images only as it reads them.
        if main:
            batches = [loaders.train, *loaders.evaluation.values()]
            write_dataset_report(run_dir, validation, damaged_images(batches, loaders.damaged))

    record_set_aside()
    criterion = distributed.global_mean(make_criterion(cfg, train_rows["label"].to_numpy()).to(device))
    optimizer = make_optimizer(cfg, loaders.module)
    scheduler = make_scheduler(cfg, optimizer, len(loaders.train))
    first_epoch, best_score = restore(last, model, optimizer, scheduler)
    train_module = distributed.wrap(loaders.module, device)
    parts = RunParts(model, loaders, train_module, criterion, optimizer, scheduler, generator)
    log_start(log, cfg, device, index, frame, train_rows, first_epoch=first_epoch, steps_per_epoch=len(loaders.train))

    # The head on cached features runs best on one thread: see core.common.runtime.torch_threads.
    with torch_threads(1) if cfg.uses_feature_cache else nullcontext():
        stopped = train_epochs(cfg, run_dir, parts, device, log, stop, first_epoch, best_score, record_set_aside)
        if main and (run_dir / "best.pt").is_file():
            finalize(run_dir, frame, cfg, model, loaders.module, loaders.evaluation, device, loaders.damaged, log=log)
            record_set_aside()
    return "stopped" if stopped else "finished"


def stop_checks(run_dir: Path, should_stop: Callable[[], bool]) -> tuple[Callable[[], bool], Callable[[], bool]]:
    """This process's own stop (``should_stop``, or a ``STOP`` file in the run folder), and the stop every
    process agrees on: all of them ask at the same step, so a stop seen by one ends that step everywhere."""
    stop_file = run_dir / STOP_FILE

    def local_stop() -> bool:
        return should_stop() or stop_file.exists()

    def agreed_stop() -> bool:
        return distributed.agree(local_stop())

    return local_stop, agreed_stop


def make_model(cfg: TrainConfig, device: torch.device) -> LesionNet:
    """The network ``cfg`` describes, on ``device``; seeded first, so a seed always starts from the same head."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.arch,
        cfg.weights,
        cfg.finetune,
        cfg.head,
        dropout=cfg.dropout,
        metadata=new_spec(cfg.metadata_dropout) if cfg.metadata else None,
    ).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def log_start(
    log: RunLog,
    cfg: TrainConfig,
    device: torch.device,
    index: DatasetIndex,
    frame: pd.DataFrame,
    train_rows: pd.DataFrame,
    *,
    first_epoch: int,
    steps_per_epoch: int,
) -> None:
    """The run's "start" event, from which the pages (:func:`core.common.runs.read_run`) tell its size and progress,
    and its "running" status."""
    log.event(
        "start",
        epochs=cfg.epochs,
        first_epoch=first_epoch,
        steps_per_epoch=steps_per_epoch,
        device=str(device),
        train_images=len(train_rows),
        cached_features=cfg.uses_feature_cache,
        split_sizes={s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")},
        dataset={"name": Path(cfg.data).resolve().name, "images": len(index.frame), "used": len(frame)},
    )
    log.status("running")


@dataclass
class RunParts:
    """What a run's epochs work on, made once by :func:`_run`."""

    model: LesionNet  # the whole network: what the checkpoints hold
    loaders: RunLoaders  # loaders.module is what trains: the network, or its head alone on cached features
    train_module: nn.Module  # loaders.module, in DistributedDataParallel under torchrun
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws the training batches


def train_epochs(
    cfg: TrainConfig,
    run_dir: Path,
    parts: RunParts,
    device: torch.device,
    log: RunLog,
    stop: Callable[[], bool],
    first_epoch: int,
    best_score: float,
    after_epoch: Callable[[], None],
) -> bool:
    """The epoch loop: train, validate, log and checkpoint each epoch from ``first_epoch`` on; ``after_epoch``
    runs after each checkpoint. Returns whether a stop ended it. Only rank 0 validates and writes."""
    epoch_seconds: list[float] = []
    for epoch in range(first_epoch, cfg.epochs + 1):
        # Seeding per epoch makes a resumed run draw the same batches and dropout masks as an uninterrupted one.
        torch.manual_seed(cfg.seed + epoch)
        parts.generator.manual_seed(cfg.seed + epoch)
        lr = parts.optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        stats = train_one_epoch(
            parts.train_module,
            parts.loaders.train,
            parts.criterion,
            parts.optimizer,
            parts.scheduler,
            device,
            epoch=epoch,
            cfg=cfg,
            log=log,
            should_stop=stop,
        )
        if stop():
            return True  # a partial epoch is not recorded; last.pt holds the previous complete one
        stats = distributed.combine_epoch(stats)
        if not distributed.is_main():
            continue
        val_logits, val_labels = collect_logits(parts.loaders.module, parts.loaders.evaluation["val"], device, cfg)
        stats.update(validation_metrics(val_logits, val_labels))
        log.event("epoch", epoch=epoch, lr=lr, **stats)
        if cfg.compile:
            epoch_seconds.append(time.perf_counter() - epoch_start)
            log_compile_cost(log, epoch_seconds)
        best_score = save_checkpoints(cfg, run_dir, parts, epoch=epoch, stats=stats, best_score=best_score)
        after_epoch()
    return False


def log_compile_cost(log: RunLog, epoch_seconds: list[float]) -> None:
    """After the first two epochs of a compiled model, what compiling cost: the first epoch (training and
    validation, compiling both) less the second; after the first alone, its time."""
    if len(epoch_seconds) == 1:
        log.event("compile", first_epoch_s=epoch_seconds[0])
        print(f"torch.compile: the first epoch, compiling included, took {epoch_seconds[0]:.1f} s", flush=True)
    elif len(epoch_seconds) == 2:
        first, second = epoch_seconds
        cost = max(0.0, first - second)
        log.event("compile", first_epoch_s=first, second_epoch_s=second, compile_cost_s=cost)
        print(f"torch.compile: the second epoch took {second:.1f} s, so compiling cost about {cost:.1f} s", flush=True)


# Checkpointing: what a run saves after each epoch, and how a resumed run picks it up again.


def read_resume_point(run_dir: Path, resume: bool, log: RunLog) -> dict | None:
    """The checkpoint a resumed run continues from (its ``last.pt``), or None for a new run. Read before anything
    is logged: the log is cut back to the epochs the checkpoint holds, so the epochs a killed run logged but did
    not save, and its progress after them, are not there twice once they rerun."""
    last = read_checkpoint(run_dir / "last.pt") if resume and (run_dir / "last.pt").is_file() else None
    log.truncate_to_epoch(last["epoch"] if last else 0)
    return last


def restore(
    last: dict | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, float]:
    """The state of ``last`` (:func:`read_resume_point`) put back into the model, optimizer and scheduler; returns
    the first epoch to train and the best score so far, which a new run (``last`` None) starts from nothing."""
    if last is None:
        return 1, -math.inf
    model.load_state_dict(last["model_state"])
    optimizer.load_state_dict(last["optimizer_state"])
    scheduler.load_state_dict(last["scheduler_state"])
    return last["epoch"] + 1, last["best_score"]


def save_checkpoints(
    cfg: TrainConfig, run_dir: Path, parts: RunParts, *, epoch: int, stats: dict, best_score: float
) -> float:
    """After a complete epoch: ``best.pt`` when the epoch beats ``best_score`` on ``cfg.select_metric``, and
    ``last.pt`` always, with what a resumed run needs (optimizer, scheduler, best score). Returns the best score
    now. Each file is replaced whole (:func:`atomic_save`), so a crash while saving leaves the previous one."""
    prep, extra = cfg.preprocessing, {"config": cfg.to_dict(), "epoch": epoch, "metrics": stats}
    # "last" keeps every new epoch: its epoch number always beats the best so far.
    score = epoch if cfg.select_metric == "last" else stats[cfg.select_metric]
    if score > best_score:
        best_score = score
        atomic_save(checkpoint_dict(parts.model, prep, head=cfg.head, **extra), run_dir / "best.pt")
    atomic_save(
        checkpoint_dict(
            parts.model,
            prep,
            head=cfg.head,
            best_score=best_score,
            optimizer_state=parts.optimizer.state_dict(),
            scheduler_state=parts.scheduler.state_dict(),
            **extra,
        ),
        run_dir / "last.pt",
    )
    return best_score


def finalize(
    run_dir: Path,
    frame: pd.DataFrame,
    cfg: TrainConfig,
    model: LesionNet,
    step_module: nn.Module,
    eval_loaders: dict,
    device: torch.device,
    found: Iterable[str] = (),
    *,
    log: RunLog | None = None,
) -> dict:
    """Calibrate the best model on the validation split and evaluate it on the test split.

    ``step_module`` is the module the loaders feed (the head, on cached features, in head-only mode).
    The test images set aside as damaged (``found`` by the feature cache, or met by the test loader)
    have no output, so their rows are left out of the predictions table. ``log`` hears the progress through
    both splits (the "evaluate" phase).
    """
    best = read_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model_state"])
    total, started, before = int(frame["split"].isin(["val", "test"]).sum()), time.time(), 0
    logits = {}
    for split in ("val", "test"):

        def report(done: int, before: int = before) -> None:
            if log is not None:
                log.phase("evaluate", before + done, total, started)

        logits[split] = collect_logits(step_module, eval_loaders[split], device, cfg, report)
        before += len(logits[split][1])
    val_logits, val_labels = logits["val"]
    temperature = fit_temperature(val_labels, val_logits) if len(val_labels) else 1.0
    test_logits, test_labels = logits["test"]
    probs = softmax(test_logits, temperature)
    val_probs = softmax(val_logits, temperature)
    operating = operating_point_fields(val_labels, val_probs)
    evaluation = {
        "temperature": temperature,
        **operating,
        "epoch": best["epoch"],
        "test": compute_metrics(test_labels, probs, **operating),
        "test_uncalibrated": compute_metrics(test_labels, softmax(test_logits), **operating),
        "val": compute_metrics(val_labels, val_probs, **operating),
    }
    damaged = damaged_images([eval_loaders["test"]], found)
    test_rows = frame[(frame["split"] == "test") & ~frame["path"].isin(damaged)]
    write_evaluation(run_dir, evaluation, test_rows, probs, test_logits)
    best["temperature"] = temperature
    best.update(operating)
    atomic_save(best, run_dir / "best.pt")
    return evaluation
