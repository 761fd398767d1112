"""Compare: the imbalance lesson (what each strategy did, on one screen), the one-click experiment that
trains it, and any runs side by side."""

import numpy as np
import pandas as pd
import streamlit as st

from core.app import estimate, lesson, plots
from core.app import jobs as app_jobs
from core.common import settings
from core.common.formatting import format_duration
from core.common.runs import RunState, read_run
from core.common.runs import list_runs as read_runs
from core.inference.features import FeatureCache, backbone_key
from core.metrics.classification import MEL_SENSITIVITY
from core.models.architectures import ARCHITECTURES, default_arch, default_arch_reason
from core.training import imbalance
from core.training.config import PRESETS, TrainConfig, config_with
from pages.views._shared import (
    WRAPPING_ROW_HEIGHT,
    current_job,
    damaged_notice,
    dataset_choice,
    evaluated_runs,
    list_runs,
    load_dataset,
    predictions,
    run_label,
    runs_dir,
    while_a_job_runs,
)

st.title("Compare")
RUNS = runs_dir()
RUN_WIDTH = 190  # pixels for a run's name, wrapping: "imbalance-20261127-101500-class_balanced" on two lines


def headline(run: RunState) -> dict:
    _, _, _, _, evaluation = predictions_or_none(run)
    t = evaluation.get("test", {})
    mel = t.get("melanoma", {})
    return {
        "run": run.name,
        # Backbone, fine-tuning and imbalance strategy in one cell that wraps: as three columns they pushed ECE off.
        "model": " · ".join(str(run.config[k]) for k in ("arch", "finetune", "imbalance") if run.config.get(k)),
        "dataset": run.dataset,
        "accuracy": t.get("accuracy"),
        "balanced accuracy": t.get("balanced_accuracy"),
        "macro F1": t.get("macro", {}).get("f1"),
        "macro AUC": t.get("roc_auc", {}).get("macro"),
        "melanoma sensitivity": mel.get("sensitivity"),
        "melanoma specificity": mel.get("specificity"),
        # The P(mel) at which the two above were measured: the run's own operating point (core.common.runs' record).
        "melanoma threshold": mel.get("threshold"),
        "ECE": t.get("ece"),
        "test images": t.get("n"),
    }


def predictions_or_none(run: RunState):
    try:
        return predictions(run.path)
    except ValueError:
        return None, None, None, None, {}


def melanoma_basis(thresholds: pd.Series) -> str:
    """What the melanoma columns are measured at: the one threshold all the runs share, else each run's own."""
    if thresholds.notna().all() and thresholds.astype(float).round(3).nunique() == 1:
        return f"melanoma at each run's operating threshold, P(mel) ≥ {thresholds.iloc[0]:.3f} for all"
    return "melanoma sensitivity and specificity at each run's own operating threshold, P(mel) ≥ mel thr."


def comparison(chosen: list[RunState]) -> None:
    table = pd.DataFrame([headline(r) for r in chosen]).set_index("run")
    shown = table.map(
        lambda v: (
            "—"
            if v is None or (isinstance(v, float) and np.isnan(v))
            else f"{v:.3f}"
            if isinstance(v, float)
            else str(v)
        )
    )  # one row per run: any number of runs fits the width, where a column per run ran off at the fifth
    st.markdown(f"**Headline metrics** (test split, calibrated; {melanoma_basis(table['melanoma threshold'])})")
    short = {
        "balanced accuracy": "bal. acc.",
        "melanoma sensitivity": "mel sens.",
        "melanoma specificity": "mel spec.",
        "melanoma threshold": "mel thr.",
    }
    helps = {
        "melanoma threshold": "The run's melanoma operating threshold: its sensitivity and specificity count an image "
        f"as flagged when P(mel) ≥ this. Chosen on the run's validation split for {MEL_SENSITIVITY:.0%} sensitivity; "
        "0.5 where the run recorded none."
    }
    # Widths in pixels: every column on screen in a 1600-pixel window with the sidebar open, long run names and
    # datasets wrapping in their cells (the names and the ECE column were cut).
    wide = {"model": 150, "dataset": 150, "macro AUC": 80, "test images": 85}
    st.dataframe(
        shown,
        width="stretch",
        key="cmp_headline",
        row_height=WRAPPING_ROW_HEIGHT,
        column_config={
            "_index": st.column_config.TextColumn("run", width=RUN_WIDTH),
            **{
                c: st.column_config.TextColumn(short.get(c, c), help=helps.get(c, c), width=wide.get(c, 68))
                for c in shown.columns
            },
        },
    )
    rows = []
    for r in chosen:
        for pc in predictions_or_none(r)[4].get("test", {}).get("per_class", []):
            rows.append(
                {
                    "run": r.name,
                    "class": pc["code"],
                    "recall": pc["recall"],
                    "precision": pc["precision"],
                    "f1": pc["f1"],
                    "support": pc["support"],
                }
            )
    per_class = pd.DataFrame(rows)
    if per_class.empty:
        return
    metric = st.segmented_control(
        "Per-class metric", ["recall", "precision", "f1"], default="recall", key="cmp_metric", required=True
    )
    st.plotly_chart(plots.per_class_comparison(per_class, metric), width="stretch")
    with st.expander("Per-class table"):
        # A row per run, as above: a column per run cut their names, and any number of runs fits this way.
        st.dataframe(
            per_class.pivot(index="run", columns="class", values=metric)
            .reindex(columns=list(plots.CLASSES))
            .reindex([r.name for r in chosen]),
            width="stretch",
            row_height=WRAPPING_ROW_HEIGHT,
            column_config={
                "_index": st.column_config.TextColumn("run", width=RUN_WIDTH),
                **{c: st.column_config.NumberColumn(c, format="%.3f", width=80) for c in plots.CLASSES},
            },
        )
    normalize = st.toggle("Row-normalised confusion matrices", value=True, key="cmp_norm")
    cols = st.columns(min(3, len(chosen)))
    for i, r in enumerate(chosen):
        cm = predictions_or_none(r)[4].get("test", {}).get("confusion_matrix")
        if cm is not None:
            cols[i % len(cols)].plotly_chart(
                plots.confusion_figure(np.array(cm), normalize=normalize, title=r.name, height=400),
                width="stretch",
                key=f"cmp_cm_{r.name}",
            )


# ---------------------------------------------------------------------------
# The experiment


@st.cache_data(ttl=600, max_entries=16, show_spinner="Counting the experiment's images…")
def _experiment_images(config: dict, dataset_images: int) -> tuple[int, dict[str, int]]:
    """``dataset_images`` is in the key so that a changed dataset is counted again."""
    return estimate.experiment_images(TrainConfig.from_dict(config), list(imbalance.STRATEGIES))


def time_estimate(cfg: TrainConfig, dataset_images: int) -> None:
    """How long the experiment will take, from the dataset's size and measured rates, and on what basis."""
    total, images = _experiment_images(cfg.to_dict(), dataset_images)
    rates = {**estimate.benchmark_rates(), **estimate.recorded_rates(list_runs(), cfg)}
    guess = estimate.estimate(images, total, cfg.epochs, rates)
    if guess is None:
        st.caption(
            "No time estimate yet: it needs the rates measured by `python -m bench.experiment` "
            "(docs/BENCHMARKS.json) or by an earlier cached head-only run here."
        )
        return
    runs = f"{len(images)} runs × {cfg.epochs} epochs on {total:,} images"
    cache = FeatureCache(settings.resolve_path(cfg.cache_dir)).path(
        backbone_key(cfg.arch, cfg.weights, cfg.preprocessing)
    )
    if cache.is_file():
        st.markdown(
            f"**Estimated time: about {format_duration(guess.cached_s)}** for {runs}, with the backbone "
            "features already cached here for this backbone and image size."
        )
    else:
        st.markdown(
            f"**Estimated time: about {format_duration(guess.features_s + guess.cached_s)}**: "
            f"{format_duration(guess.features_s)} to compute the backbone features once, then "
            f"{format_duration(guess.cached_s)} for {runs} (what later experiments with this backbone and "
            "image size take)."
        )
    st.caption(
        f"Estimated from the images each strategy's epochs hold and these rates: {guess.basis()} "
        + estimate.load_note()
    )


def experiment_form(index) -> None:
    job = app_jobs.active_job(RUNS)
    labels = ", ".join(s.label for s in imbalance.STRATEGIES.values())
    st.markdown(
        f"Train the same model once per strategy — **{labels}** — in cached head-only mode (frozen "
        "backbone, features computed once and shared), in one process, then compare them here as they "
        "finish."
    )
    # Plain widgets rather than a form: the time estimate follows every change before the click.
    c = st.columns(5)
    seed_arch = PRESETS["seed"].arch
    start_arch = default_arch(seed_arch)
    arch = c[0].selectbox(
        "Architecture", list(ARCHITECTURES), key="exp_arch", index=list(ARCHITECTURES).index(start_arch)
    )
    if start_arch != seed_arch:
        st.info(
            f"The experiment starts with **{start_arch}** instead of the seed pipeline's {seed_arch}: "
            + default_arch_reason(seed_arch, start_arch),
            icon=":material/cloud_off:",
        )
    weights = c[1].selectbox("Weights", ["imagenet", "none"], key="exp_weights")
    epochs = c[2].number_input("Epochs", 1, 100, 5, key="exp_epochs")
    size = c[3].number_input("Image size", 32, 512, 224, step=16, key="exp_size")
    max_images = c[4].number_input("At most N images (0 = all)", 0, 1_000_000, 0, key="exp_max")
    weights_path = st.text_input(
        "…or a weights file", key="exp_weights_path", placeholder="path/to/torchvision_state_dict.pth"
    )
    cfg = None
    weights_path = weights_path.strip()
    if weights_path and not settings.resolve_path(weights_path).is_file():
        st.error(f"The weights file {weights_path} does not exist.", icon=":material/block:")
    elif index is not None:
        cfg = config_with(
            "seed",
            data=str(dataset_choice().folder),
            arch=arch,
            weights=str(settings.resolve_path(weights_path)) if weights_path else weights,
            epochs=int(epochs),
            input_size=(int(size), int(size)),
            max_images=int(max_images) or None,
        )
        time_estimate(cfg, len(index.frame))
    go = st.button(
        "Run the imbalance experiment",
        type="primary",
        icon=":material/science:",
        disabled=job is not None or cfg is None,
        key="exp_go",
    )
    if index is None:
        st.caption("The experiment needs a dataset (see the Dataset page).")
    if job is not None:
        st.info(
            "A training job is running; the experiment can start when it has finished.", icon=":material/hourglass_top:"
        )
    if go:
        try:
            started = app_jobs.start_experiment({**cfg.to_dict(), "name": ""}, RUNS)
        except app_jobs.JobBusyError as exc:
            st.error(str(exc), icon=":material/hourglass_top:")
        except (app_jobs.JobError, ValueError, OSError) as exc:
            st.error(f"The experiment could not start: {exc}", icon=":material/block:")
        else:
            st.session_state["cmp_experiment"] = started.experiment
            st.rerun()


def experiment_progress(manifest: dict, runs: list[tuple[str, RunState | None]], current: RunState | None) -> None:
    """Where the running experiment is and how long it has left, estimated from the speed its own runs measure on
    this machine (core.app.estimate.time_left) and updated each time the fragment redraws; above the table, whose
    detail column a narrow window cuts."""
    strategies = [s for s, _ in runs]
    if current is None or current.name not in manifest["runs"]:
        st.markdown(f"**Starting the experiment** ({len(runs)} runs): loading the dataset and the model…")
        return
    k = manifest["runs"].index(current.name)
    st.markdown(f"**Run {k + 1} of {len(runs)}: {imbalance.label(strategies[k])}** — {current.progress_text()}")
    try:
        cfg = TrainConfig.from_dict(manifest["base"])
    except (KeyError, TypeError, ValueError):  # a manifest from before it recorded its settings: no estimate
        return
    total, images = _experiment_images(cfg.to_dict(), 0)  # the experiment's dataset as it started: counted once
    fallback = {**estimate.benchmark_rates(), **estimate.recorded_rates(list_runs(), cfg)}
    left = estimate.time_left(runs, images, total, cfg, fallback)
    if left is None:
        st.caption("Time left: measuring this machine's speed…")
        return
    st.markdown(f"About **{format_duration(left.seconds)}** left for the whole experiment.")
    st.caption(f"From the speed measured on this machine as it runs, updated every second: {left.basis()}.")


def experiment_status(manifest: dict) -> None:
    job, current = current_job()
    rows, runs = [], []
    for name, strategy in zip(manifest["runs"], manifest.get("strategies", []), strict=False):
        path = RUNS / name
        run = read_run(path, job) if path.exists() else None
        runs.append((strategy, run))
        queued = job is not None and name in job.runs and not job.stop_requested  # a stop starts no more runs
        state = run.state if run else ("queued" if queued else "not run")
        rows.append(
            {
                "strategy": imbalance.label(strategy),
                "run": name,
                "state": state,
                "progress": run.fraction_done() if run else 0.0,
                "detail": run.progress_text() if run and not run.done else (run.error or "" if run else ""),
            }
        )
    # A run that stopped or failed ends the queue: no Stop for a job whose processes are only exiting.
    ending = current is not None and current.state in ("stopped", "failed", "interrupted")
    running = job is not None and job.experiment == manifest["name"] and not ending
    if running and not job.stop_requested:
        experiment_progress(manifest, runs, current)
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "progress": st.column_config.ProgressColumn(min_value=0, max_value=1, width="small"),
            "detail": st.column_config.TextColumn(width="large"),
        },
    )
    if running:
        if job.stop_requested:
            st.warning(
                "Stopping: the current run ends after its step; the queued ones will not start.",
                icon=":material/stop_circle:",
            )
        else:
            st.button(
                "Stop the experiment",
                icon=":material/stop_circle:",
                key="exp_stop",
                on_click=app_jobs.stop_job,
                args=(RUNS,),
            )


# ---------------------------------------------------------------------------
# The lesson


def lesson_view(experiment: lesson.Experiment) -> None:
    """What each strategy did to each class: the sentences, then the charts and the numbers they are made of."""
    evaluated = experiment.evaluated()
    if len(evaluated) < 2:
        st.info(
            "The lesson appears here once two runs of this experiment have finished.", icon=":material/hourglass_top:"
        )
        return
    records, damaged = {}, {}
    for strategy, path in evaluated.items():
        try:
            records[strategy] = predictions(path)
        except ValueError as exc:  # a damaged record: the lesson is told from the others
            damaged[path.name] = str(exc)
    damaged_notice(damaged)
    if len(records) < 2:
        return
    table = lesson.strategy_table({s: r[4] for s, r in records.items()})
    st.markdown("\n".join(f"- {sentence}" for sentence in lesson.sentences(table)))
    charts = st.columns([4, 3, 3])
    charts[0].plotly_chart(plots.strategy_heatmap(table), width="stretch", key="lesson_heatmap")
    curves = {s: lesson.melanoma_curve(r[1], r[2]) for s, r in records.items()}
    charts[1].plotly_chart(plots.melanoma_precision_recall(table, curves), width="stretch", key="lesson_melanoma")
    charts[2].plotly_chart(plots.accuracy_pairs(table), width="stretch", key="lesson_accuracy")
    st.caption(
        "All on the test split, after temperature scaling. Melanoma: a dot is the strategy's recall and "
        "precision as the model predicts (the most probable class, as in the heatmap); its line is what "
        "flagging melanoma whenever P(mel) ≥ t would give, t from 0.02 to 0.98 (hover for t): a lower t finds "
        "more melanomas and flags more benign lesions with them. Balanced accuracy is the mean of the seven "
        "recalls. Runs: " + ", ".join(f"{table.loc[s, 'label']} `{path.name}`" for s, path in evaluated.items()) + "."
    )
    with st.expander("The numbers", icon=":material/table:"):
        shown = lesson.shown_table(table)
        st.dataframe(shown, width="content", height=35 * (len(shown) + 1) + 3, key="lesson_numbers")


def lesson_tab(manifests: list[dict]) -> None:
    """The newest experiment trained here, else the published one; the picker offers the others."""
    published_dir = settings.published_runs_dir()
    experiments = lesson.local_experiments(manifests, RUNS) + lesson.published_experiments(
        read_runs(published_dir) if published_dir else []
    )
    if experiments:
        keys = [e.key for e in experiments]
        started = st.session_state.pop("cmp_experiment", None)
        if started in keys:  # just started with the form below: show it, whatever was picked before
            st.session_state["cmp_experiment_pick"] = started
        key = st.selectbox(
            "Experiment", keys, format_func=lambda k: experiments[keys.index(k)].title, key="cmp_experiment_pick"
        )
        chosen = experiments[keys.index(key)]
        manifest = next((m for m in manifests if m["name"] == chosen.key), None)
        if manifest is not None:
            job = app_jobs.active_job(RUNS)
            with st.expander("Its runs", expanded=job is not None and job.experiment == manifest["name"]):
                while_a_job_runs(job is not None, experiment_status, manifest)
        lesson_view(chosen)
    else:
        st.info(
            "No imbalance experiment yet: run one below (one run per strategy) and the lesson appears here as "
            "its runs finish.",
            icon=":material/school:",
        )
    with st.expander("Run the imbalance experiment", expanded=not experiments, icon=":material/science:"):
        experiment_form(load_dataset(show_help=False))


runs = evaluated_runs()
manifests = app_jobs.list_experiments(RUNS)
tab_lesson, tab_cmp = st.tabs(["Imbalance lesson", "Compare runs"])

with tab_lesson:
    lesson_tab(manifests)

with tab_cmp:
    if len(runs) < 2 and not list_runs():
        st.info(
            "Comparing needs at least two finished runs. Train them on the Train page, or run the imbalance "
            "experiment (first tab), which trains one run per imbalance strategy for you.",
            icon=":material/science:",
        )
    names = [r.name for r in runs]
    default = []
    if manifests:
        default = [n for n in manifests[0]["runs"] if n in names]
    if len(default) < 2:
        default = names[:2]
    chosen = st.multiselect(
        "Runs", names, default=default, format_func=lambda n: run_label(runs[names.index(n)]), key="cmp_runs"
    )
    if len(chosen) >= 2:
        comparison([runs[names.index(n)] for n in chosen])
    elif runs:
        st.caption("Choose two or more runs.")
