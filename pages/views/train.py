"""Train: configure a run, start it in the background, and watch it live."""

import streamlit as st

from core.app import jobs as app_jobs
from core.app import plots
from core.common.runs import DAMAGED, RunState, default_run_name, epochs_table, list_runs, running_loss_table
from core.common.runtime import gpu_count
from core.data.preprocessing import MAX_INPUT_SIDE, MIN_INPUT_SIDE
from core.models.architectures import (
    ARCHITECTURES,
    FINETUNE_POLICIES,
    default_arch,
    default_arch_reason,
    imagenet_here,
    weights_cache,
)
from pages.views._shared import (
    current_job,
    dataset_choice,
    fmt_seconds,
    load_dataset,
    run_progress,
    runs_dir,
    while_a_job_runs,
)

st.title("Train")

try:
    from core.data.dataset import UNKNOWN_SOURCE
    from core.data.preprocessing import (
        AUGMENTATION_HELP,
        AUGMENTATIONS,
        COLOUR_CONSTANCY,
        COLOUR_CONSTANCY_HELP,
        JPEG_QUALITY_HELP,
        SHADES_OF_GRAY_P,
    )
    from core.data.splits import holdout_sources
    from core.training import imbalance
    from core.training.config import PRESETS, SCHEDULERS, TrainConfig, config_with
except ImportError as exc:  # a broken install must not take the page down
    st.error(f"The trainer cannot be loaded ({exc}). Check the installation (`pip install -r requirements.txt`).")
    st.stop()

RUNS = runs_dir()

index = load_dataset()
job = app_jobs.active_job(RUNS)


def config_form() -> None:
    preset = st.selectbox(
        "Preset",
        sorted(PRESETS),
        index=sorted(PRESETS).index("seed"),
        key="train_preset",
        help="Fills the form with a known-good configuration; `seed` is the course project's "
        "pipeline (frozen ImageNet ResNet-18, MLP head, oversampling).",
    )
    base = PRESETS[preset]
    k = f"_{preset}"  # widget keys per preset, so choosing a preset resets the form to its values
    start_arch = default_arch(base.arch) if base.weights == "imagenet" else base.arch
    if start_arch != base.arch:
        st.info(
            f"The form starts with **{start_arch}** instead of the preset's {base.arch}: "
            + default_arch_reason(base.arch, start_arch),
            icon=":material/cloud_off:",
        )
    with st.form("train_form", border=True):
        c1, c2, c3, c4 = st.columns(4)
        # Empty by default: a name computed here would come from the preset, not from the architecture and
        # strategy chosen below (forms send their values only on submit).
        name = c1.text_input(
            "Run name",
            key="run_name" + k,
            placeholder="automatic: date-architecture-strategy",
            help="Leave empty for <date>-<time>-<architecture>-<imbalance strategy>.",
        )
        arch = c2.selectbox(
            "Architecture",
            list(ARCHITECTURES),
            index=list(ARCHITECTURES).index(start_arch),
            format_func=lambda a: a if imagenet_here(a) else f"{a} (no ImageNet file here)",
            key="arch" + k,
            help="ImageNet weights are read from torchvision's cache "
            f"({weights_cache()}), else from the package that ships them (EfficientNet-Lite0's comes with "
            "Lesion Lab); an architecture without its file trains only from scratch or from a weights file, "
            "unless this computer can download it.",
        )
        weights_opts = ["imagenet", "none"]
        weights = c3.selectbox(
            "Pretrained weights",
            weights_opts,
            index=weights_opts.index(base.weights) if base.weights in weights_opts else 0,
            format_func={"imagenet": "ImageNet", "none": "none (random init)"}.get,
            key="weights" + k,
        )
        weights_file_path = c4.text_input(
            "…or a weights file",
            key="weights_path" + k,
            placeholder="path/to/torchvision_state_dict.pth",
            help="A torchvision state dict for the chosen architecture; overrides the choice on the left.",
        )
        c1, c2, c3 = st.columns(3)
        finetune = c1.selectbox(
            "Fine-tuning",
            FINETUNE_POLICIES,
            index=FINETUNE_POLICIES.index(base.finetune),
            format_func={
                "head": "head only (frozen backbone)",
                "last": "last block + head",
                "full": "full network",
            }.get,
            key="finetune" + k,
        )
        strategies = list(imbalance.STRATEGIES)
        strategy = c2.selectbox(
            "Imbalance strategy",
            strategies,
            index=strategies.index(base.imbalance),
            format_func=lambda s: f"{imbalance.get(s).label} — {imbalance.get(s).explanation}",
            key="imbalance" + k,
        )
        augmentation = c3.selectbox(
            "Augmentation",
            AUGMENTATIONS,
            index=AUGMENTATIONS.index(base.augmentation),
            key="augmentation" + k,
            help="  \n".join(AUGMENTATION_HELP.values()),
        )
        c1, c2, c3, c4 = st.columns(4)
        epochs = c1.number_input("Epochs", 1, 200, base.epochs, key="epochs" + k)
        batch_size = c2.number_input("Batch size", 1, 1024, base.batch_size, key="batch" + k)
        lr = c3.number_input("Learning rate", 1e-6, 1.0, float(base.lr), format="%.0e", step=1e-4, key="lr" + k)
        scheduler = c4.selectbox(
            "LR scheduler", SCHEDULERS, index=SCHEDULERS.index(base.scheduler), key="scheduler" + k
        )
        c1, c2, c3, c4 = st.columns(4)
        height = c1.number_input("Image height", MIN_INPUT_SIDE, MAX_INPUT_SIDE, int(base.input_size[0]), key="h" + k)
        width = c2.number_input("Image width", MIN_INPUT_SIDE, MAX_INPUT_SIDE, int(base.input_size[1]), key="w" + k)
        seed = c3.number_input("Seed", 0, 2**31 - 1, base.seed, key="seed" + k)
        max_images = c4.number_input(
            "Use at most N images (0 = all)",
            0,
            1_000_000,
            0,
            key="max" + k,
            help="A stratified subsample, for quick experiments.",
        )
        colour_constancy, jpeg_quality, holdout_source = away_from_home(base, k)
        use_metadata = st.checkbox(
            "Also learn from age, sex and body site",
            value=base.metadata,
            key="metadata" + k,
            help="The head also takes the metadata table's age, sex and localization; in training each is "
            f"withheld with probability {base.metadata_dropout:g}, so the model still answers when one is "
            "unknown. Diagnose then offers the three as optional inputs.",
        )
        visible_gpus = gpu_count()
        gpus = 1
        if visible_gpus > 1:
            gpus = st.selectbox(
                "GPUs",
                range(1, visible_gpus + 1),
                index=visible_gpus - 1,
                key="gpus" + k,
                help="More than one trains with torchrun, a process per GPU, each on its share of every batch "
                "(the batch size is the total, so it must divide evenly); the result is that of one GPU.",
            )
        if finetune == "head" and (augmentation != "none" or jpeg_quality):
            st.caption(
                "Head-only runs train on cached backbone features computed without augmentation or the JPEG "
                "re-save (much faster); both apply to the other fine-tuning policies."
            )
        busy = job is not None
        submitted = st.form_submit_button(
            "Start training", type="primary", disabled=busy or index is None, icon=":material/play_arrow:"
        )
    if busy:
        st.info(
            "A training job is running (below). Only one job runs at a time: stop it or wait for it to "
            "finish before starting another.",
            icon=":material/hourglass_top:",
        )
    if not submitted:
        return
    if weights_file_path.strip():
        weights = weights_file_path.strip()
    try:
        cfg = config_with(
            base,
            name=name.strip(),
            arch=arch,
            weights=weights,
            finetune=finetune,
            imbalance=strategy,
            augmentation=augmentation,
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            scheduler=scheduler,
            input_size=(int(height), int(width)),
            colour_constancy=colour_constancy,
            jpeg_quality=int(jpeg_quality),
            holdout_source=holdout_source,
            seed=int(seed),
            max_images=int(max_images) or None,
            metadata=use_metadata,
            data=str(dataset_choice().folder),
            out=str(RUNS),
        )
        config = cfg.to_dict()
        started = app_jobs.start_training(
            {**config, "name": config["name"] or default_run_name(config, RUNS)}, RUNS, gpus=gpus
        )
    except app_jobs.JobBusyError as exc:
        st.error(str(exc), icon=":material/hourglass_top:")
    except (app_jobs.JobError, ValueError, OSError) as exc:
        st.error(f"Training could not start: {exc}", icon=":material/block:")
    else:
        st.toast(f"Training {started.runs[0]} started", icon=":material/model_training:")
        st.rerun()


def away_from_home(base: TrainConfig, k: str) -> tuple[str, int, str]:
    """The form's settings for images from other clinics: colour constancy, the JPEG re-save, and an image source held
    out as the test split (the leave-one-source-out protocol: MODEL_CARD.md, Results by image source)."""
    c1, c2, c3 = st.columns(3)
    colour_constancy = c1.selectbox(
        "Colour constancy",
        COLOUR_CONSTANCY,
        index=COLOUR_CONSTANCY.index(base.colour_constancy),
        format_func={"none": "none", "shades_of_gray": f"Shades of Gray (p = {SHADES_OF_GRAY_P})"}.get,
        key="colour" + k,
        help=COLOUR_CONSTANCY_HELP[0].upper() + COLOUR_CONSTANCY_HELP[1:] + ".",
    )
    jpeg_quality = c2.number_input(
        "JPEG re-save from quality (0 = off)",
        0,
        100,
        int(base.jpeg_quality),
        step=10,
        key="jpeg" + k,
        help=JPEG_QUALITY_HELP[0].upper() + JPEG_QUALITY_HELP[1:] + ".",
    )
    # Images per known source, largest first.
    sizes = {} if index is None else index.source_counts().sum(axis=1).drop(UNKNOWN_SOURCE, errors="ignore").to_dict()
    known = list(sizes)
    reportable = holdout_sources(index.frame)[0] if known else []

    def source_label(source: str) -> str:
        if not source:
            return "none (the usual split)"
        note = "" if source in reportable else "; too few classes for the leave-one-source-out report"
        return f"{source} ({sizes[source]:,} images{note})"

    holdout_source = c3.selectbox(
        "Hold out an image source",
        ["", *known],
        format_func=source_label,
        key="holdout" + k,
        disabled=not known,
        help="Validation away from home: train and validate on the other image sources and test on this one, so "
        "the test split measures a clinic the model never saw; the other sources' images of its lesions are left "
        "out. "
        + (
            "This dataset's image sources are not known (HAM10000_sources.csv beside the metadata)."
            if not known
            else "The run's test results are then that source's."
        ),
    )
    return colour_constancy, jpeg_quality, holdout_source


def show_run(run: RunState, active: bool, controls=None) -> None:
    """Progress, curves and outcome of one run; ``controls`` draws buttons under the progress bar."""
    icon = {
        "finished": ":material/check_circle:",
        "stopped": ":material/stop_circle:",
        "failed": ":material/error:",
        "interrupted": ":material/error:",
        DAMAGED: ":material/report:",
    }.get(run.state, ":material/hourglass_top:")
    st.subheader(f"{icon} {run.name}")
    cfg = run.config
    if cfg:
        st.caption(
            " · ".join(
                f"{k} {cfg[k]}"
                for k in ("arch", "weights", "finetune", "imbalance", "epochs", "batch_size", "lr")
                if k in cfg
            )
            # The settings for other clinics, only where a run used them (most runs do not).
            + "".join(
                f" · {label} {cfg[k]}"
                for k, label in (
                    ("colour_constancy", "colour constancy"),
                    ("jpeg_quality", "JPEG re-save from"),
                    ("holdout_source", "held out"),
                )
                if cfg.get(k) not in (None, "", "none", 0)
            )
            + (f" · device {run.start['device']}" if run.start and run.start.get("device") else "")
            + f" · data {run.dataset}"
        )
    run_progress(run)
    if controls is not None:
        controls()
    if run.epochs or run.steps:
        st.plotly_chart(
            plots.training_curves(epochs_table(run), running_loss_table(run)), width="stretch", key=f"curves_{run.name}"
        )
    if run.epochs:
        last = run.epochs[-1]
        m = st.columns(4)
        m[0].metric("Validation accuracy", f"{last.get('val_acc', float('nan')):.3f}")
        m[1].metric("Validation balanced acc.", f"{last.get('val_balanced_acc', float('nan')):.3f}")
        m[2].metric("Train loss", f"{last.get('train_loss', float('nan')):.4f}")
        m[3].metric("Epoch time", fmt_seconds(last.get("seconds")))
    elif active:
        st.caption("Validation curves appear when the first epoch is done; the running training loss is live.")
    if run.state == "finished":
        st.success(
            "Finished: the best checkpoint was calibrated and evaluated on the test split.",
            icon=":material/check_circle:",
        )
        st.page_link("pages/views/evaluate.py", label="Open it on Evaluate", icon=":material/analytics:")
    elif run.state == "stopped":
        st.info("Stopped on request." + (" The best epoch so far was saved and evaluated." if run.has_model else ""))
    elif run.state in ("failed", "interrupted"):
        st.error(f"Training failed: {run.error or 'no error message'}", icon=":material/error:")
    elif run.state == DAMAGED:
        st.error(
            f"This run's records are damaged, so Evaluate and Compare leave it out: {run.error}",
            icon=":material/report:",
        )
    if run.state in ("failed", "interrupted") or active:
        with st.expander("Training log (last lines)"):
            st.code(run.log_tail() or "(empty)", language=None)


def _progress() -> None:
    current, run = current_job()
    if current is not None and current.id != "?":
        if run is None:
            st.info("Starting the training process…", icon=":material/hourglass_top:")
            return

        def controls() -> None:
            if run.done:  # its trainer has written how it ended; the job's processes are exiting
                return
            if current.stop_requested:
                st.warning(
                    "Stopping: the run ends after its current step and still saves its best epoch.",
                    icon=":material/stop_circle:",
                )
                st.button(
                    "Force stop now",
                    on_click=app_jobs.kill_job,
                    args=(RUNS,),
                    help="Terminate the training process immediately (nothing more is saved).",
                )
            else:
                # A callback runs before the rerun it triggers, so the page shows "Stopping" at once.
                st.button("Stop training", icon=":material/stop_circle:", on_click=app_jobs.stop_job, args=(RUNS,))

        show_run(run, active=True, controls=controls)
        if current.kind == "experiment":
            st.caption(f"Part of the imbalance experiment {current.experiment}; see it on Compare.")
        return
    runs = list_runs(RUNS, current)
    if not runs:
        st.caption("No runs yet. Runs are saved in " + f"`{RUNS}`.")
        return
    names = [r.name for r in runs]
    chosen = st.selectbox("Show run", names, key="train_show_run")
    show_run(runs[names.index(chosen)], active=False)


if index is None and job is None:
    st.caption("Training needs a dataset (above). Past runs are listed below.")
st.markdown("#### New run")
config_form()
st.markdown("#### Progress")
while_a_job_runs(job is not None, _progress)
