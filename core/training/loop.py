"""The trainer: a config dataclass, explicit loops, and a run folder that survives crashes.

What a run folder holds is described in :mod:`core.common.runs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from datetime import datetime
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
    write_config,
    write_dataset_report,
    write_evaluation,
    write_split,
)
from core.common.runtime import compile_problem, pick_device, torch_threads, tune_allocator
from core.inference.forward import predict_logits
from core.metrics.calibration import fit_temperature, softmax
from core.metrics.classification import compute_metrics, operating_point_fields
from core.models.architectures import LesionNet, build_model, train_mode
from core.models.checkpoints import atomic_save, checkpoint_dict, read_checkpoint
from core.models.metadata import new_spec
from core.training import distributed, imbalance
from core.training.config import TrainConfig, check_metadata
from core.training.loaders import SharedInputs, _loaders, damaged_images, prepare_data


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


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
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
    name = (
        check_run_name(cfg.name)
        if cfg.name
        else f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}-{cfg.finetune}-{cfg.imbalance}"
    )
    run_dir = Path(cfg.out) / name
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run; resume it or choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    cfg: TrainConfig,
    log: RunLog,
    should_stop: Callable[[], bool],
) -> dict:
    """One pass over the training data. ``model`` is the whole network, or only the head on cached features."""
    if isinstance(distributed.unwrap(model), LesionNet):
        train_mode(distributed.unwrap(model))
    else:
        model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    steps = len(loader)
    # Each step's loss and correct count stay on the device until a progress line needs them: reading them
    # every step would make the host wait for the device at every step.
    pending: list[tuple[torch.Tensor, int]] = []
    # A network that takes metadata and trains on images gets each batch's encoded rows after its labels.
    for step, (inputs, targets, *metadata) in enumerate(loader, 1):
        if not len(targets):
            continue  # every image of the batch was damaged (LesionDataset.collate left them out)
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

        pending.append(
            (torch.stack((loss.detach().float(), (logits.argmax(1) == targets).sum().float())), len(targets))
        )
        seen += len(targets)
        if step == steps or log.progress_due():
            total_loss, correct = _settle(pending, total_loss, correct)
            elapsed = time.perf_counter() - start
            log.progress(
                force=True,
                epoch=epoch,
                step=step,
                steps=steps,
                loss=total_loss / seen,
                images_per_s=seen / elapsed if elapsed > 0 else 0.0,
                eta_s=(steps - step) * elapsed / step,
            )
        if should_stop():
            break
    total_loss, correct = _settle(pending, total_loss, correct)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }


def _settle(pending: list[tuple[torch.Tensor, int]], total_loss: float, correct: int) -> tuple[float, int]:
    """Add the pending steps' (loss, correct) pairs, read from the device at once, to the totals; empties
    ``pending``. The sums are those of reading each step's loss on its own."""
    if pending:
        values = torch.stack([v for v, _ in pending]).tolist()
        for (loss, right), (_, n) in zip(values, pending, strict=True):
            total_loss += loss * n
            correct += int(right)
        pending.clear()
    return total_loss, correct


def collect_logits(
    model: nn.Module, loader, device: torch.device, cfg: TrainConfig, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core.inference.forward.predict_logits` under the run's autocast setting."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        return predict_logits(model, loader, device, progress)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
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
    check_metadata(cfg)
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
        check_metadata(cfg)
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
    device = distributed.local_device(pick_device(cfg.device))
    main = distributed.is_main()  # rank 0 alone writes the run folder
    if main:
        write_config(run_dir, cfg.to_dict())
    stop_file = run_dir / STOP_FILE
    local_stop = lambda: should_stop() or stop_file.exists()  # noqa: E731
    # Every process asks at the same step, so a stop seen by one ends that step everywhere.
    stop = lambda: distributed.agree(local_stop())  # noqa: E731
    # Read before anything is logged: the log is cut back to the epochs the checkpoint holds, so the epochs a
    # killed run logged but did not save, and its progress after them, are not there twice once they rerun.
    last = read_checkpoint(run_dir / "last.pt") if resume and (run_dir / "last.pt").is_file() else None
    log.truncate_to_epoch(last["epoch"] if last else 0)

    index = shared.index(cfg)
    frame, train_rows = prepare_data(cfg, shared.frame(cfg))
    if main:
        write_split(run_dir, frame)
    validation = {**index.report.to_dict(), "ok": index.report.ok, "summary": index.report.summary()}

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
    generator = torch.Generator().manual_seed(cfg.seed)
    # Only rank 0 computes the features, so it alone checks for a stop between their batches: a collective
    # there would wait for processes that never reach it. Its StopRequested reaches every process
    # (distributed.from_main), so all of them stop here.
    try:
        step_module, train_loader, eval_loaders, found = _loaders(
            cfg, model, frame, train_rows, device, log, generator, shared, local_stop
        )
    except StopRequested:  # computing the features (kept in their cache) or decoding the images took the stop
        return "stopped"
    if cfg.compile:
        # What trains, the head alone on cached features. In place: the module, its state dict and its
        # checkpoints stay as they are.
        step_module.compile()
    loaders = [train_loader, *eval_loaders.values()]

    def record_set_aside() -> None:
        if main:
            write_dataset_report(run_dir, validation, damaged_images(loaders, found))

    record_set_aside()
    criterion = distributed.global_mean(make_criterion(cfg, train_rows["label"].to_numpy()).to(device))
    optimizer = make_optimizer(cfg, step_module)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))

    start_epoch, best_score = 1, -math.inf
    if last is not None:
        model.load_state_dict(last["model_state"])
        optimizer.load_state_dict(last["optimizer_state"])
        scheduler.load_state_dict(last["scheduler_state"])
        start_epoch, best_score = last["epoch"] + 1, last["best_score"]
    train_module = distributed.wrap(step_module, device)

    log.event(
        "start",
        epochs=cfg.epochs,
        first_epoch=start_epoch,
        steps_per_epoch=len(train_loader),
        device=str(device),
        train_images=len(train_rows),
        cached_features=cfg.uses_feature_cache,
        split_sizes={s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")},
        dataset={"name": Path(cfg.data).resolve().name, "images": len(index.frame), "used": len(frame)},
    )
    log.status("running")
    prep = cfg.preprocessing
    stopped = False
    epoch_seconds: list[float] = []
    # The head on cached features runs best on one thread: see core.common.runtime.torch_threads.
    with torch_threads(1) if cfg.uses_feature_cache else nullcontext():
        for epoch in range(start_epoch, cfg.epochs + 1):
            # Seeding per epoch makes a resumed run draw the same batches and dropout masks as an uninterrupted one.
            torch.manual_seed(cfg.seed + epoch)
            generator.manual_seed(cfg.seed + epoch)
            lr = optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            stats = train_one_epoch(
                train_module,
                train_loader,
                criterion,
                optimizer,
                scheduler,
                device,
                epoch=epoch,
                cfg=cfg,
                log=log,
                should_stop=stop,
            )
            if stop():
                stopped = True
                break  # a partial epoch is not recorded; last.pt holds the previous complete one
            stats = distributed.combine_epoch(stats)
            if not main:
                continue
            stats.update(validation_metrics(*collect_logits(step_module, eval_loaders["val"], device, cfg)))
            log.event("epoch", epoch=epoch, lr=lr, **stats)
            if cfg.compile:
                epoch_seconds.append(time.perf_counter() - epoch_start)
                log_compile_cost(log, epoch_seconds)
            extra = {"config": cfg.to_dict(), "epoch": epoch, "metrics": stats}
            # "last" keeps every new epoch: its epoch number always beats the best so far.
            score = epoch if cfg.select_metric == "last" else stats[cfg.select_metric]
            if score > best_score:
                best_score = score
                atomic_save(checkpoint_dict(model, prep, head=cfg.head, **extra), run_dir / "best.pt")
            atomic_save(
                checkpoint_dict(
                    model,
                    prep,
                    head=cfg.head,
                    best_score=best_score,
                    optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(),
                    **extra,
                ),
                run_dir / "last.pt",
            )
            record_set_aside()
        if main and (run_dir / "best.pt").is_file():
            finalize(run_dir, frame, cfg, model, step_module, eval_loaders, device, found, log=log)
            record_set_aside()
    return "stopped" if stopped else "finished"


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
