"""Compare: runs side by side, and the one-click class-imbalance experiment."""
import numpy as np
import pandas as pd
import streamlit as st

from core import imbalance, jobs, plots
from core.models import ARCHITECTURES, default_arch
from core.runs import FINAL_STATES, RunState, read_run
from pages.views._shared import dataset_choice, evaluated_runs, list_runs, load_dataset, run_label, runs_dir

st.title("Compare")
RUNS = runs_dir()


def headline(run: RunState) -> dict:
    _, _, _, _, evaluation = predictions_or_none(run)
    t = evaluation.get("test", {})
    mel = t.get("melanoma", {})
    return {"run": run.name, "arch": run.config.get("arch"), "fine-tuning": run.config.get("finetune"),
            "imbalance": run.config.get("imbalance"), "accuracy": t.get("accuracy"),
            "balanced accuracy": t.get("balanced_accuracy"), "macro F1": t.get("macro", {}).get("f1"),
            "macro AUC": t.get("roc_auc", {}).get("macro"), "melanoma sensitivity": mel.get("sensitivity"),
            "melanoma specificity": mel.get("specificity"), "ECE": t.get("ece"), "test images": t.get("n")}


def predictions_or_none(run: RunState):
    from pages.views._shared import predictions

    try:
        return predictions(run.path)
    except ValueError:
        return None, None, None, None, {}


def comparison(chosen: list[RunState]) -> None:
    table = pd.DataFrame([headline(r) for r in chosen]).set_index("run")
    shown = table.map(lambda v: "—" if v is None or (isinstance(v, float) and np.isnan(v))
                      else f"{v:.3f}" if isinstance(v, float) else str(v)).T  # one column per run
    st.markdown("**Headline metrics** (test split, calibrated; melanoma at P(mel) ≥ 0.5)")
    st.dataframe(shown, width="stretch", height=36 * (len(shown) + 1) + 4)
    rows = []
    for r in chosen:
        for pc in predictions_or_none(r)[4].get("test", {}).get("per_class", []):
            rows.append({"run": r.name, "class": pc["code"], "recall": pc["recall"], "precision": pc["precision"],
                         "f1": pc["f1"], "support": pc["support"]})
    per_class = pd.DataFrame(rows)
    if per_class.empty:
        return
    metric = st.segmented_control("Per-class metric", ["recall", "precision", "f1"], default="recall",
                                  key="cmp_metric", required=True)
    st.plotly_chart(plots.per_class_comparison(per_class, metric), width="stretch")
    with st.expander("Per-class table"):
        st.dataframe(per_class.pivot(index="class", columns="run", values=metric).reindex(
            [c for c in plots.CLASSES]), width="stretch")
    normalize = st.toggle("Row-normalised confusion matrices", value=True, key="cmp_norm")
    cols = st.columns(min(3, len(chosen)))
    for i, r in enumerate(chosen):
        cm = predictions_or_none(r)[4].get("test", {}).get("confusion_matrix")
        if cm is not None:
            cols[i % len(cols)].plotly_chart(
                plots.confusion_figure(np.array(cm), normalize=normalize, title=r.name, height=400),
                width="stretch", key=f"cmp_cm_{r.name}")


def experiment_form() -> None:
    index = load_dataset(show_help=False)
    job = jobs.active_job(RUNS)
    labels = ", ".join(s.label for s in imbalance.STRATEGIES.values())
    st.markdown(f"Train the same model once per strategy — **{labels}** — in cached head-only mode (frozen "
                "backbone, features computed once and shared), then compare them here as they finish.")
    with st.form("experiment_form"):
        c = st.columns(5)
        arch = c[0].selectbox("Architecture", list(ARCHITECTURES), key="exp_arch",
                              index=list(ARCHITECTURES).index(default_arch("resnet18")))
        weights = c[1].selectbox("Weights", ["imagenet", "none"], key="exp_weights")
        weights_path = st.text_input("…or a weights file", key="exp_weights_path",
                                     placeholder="path/to/torchvision_state_dict.pth")
        epochs = c[2].number_input("Epochs", 1, 100, 5, key="exp_epochs")
        size = c[3].number_input("Image size", 32, 512, 224, step=16, key="exp_size")
        max_images = c[4].number_input("At most N images (0 = all)", 0, 1_000_000, 0, key="exp_max")
        go = st.form_submit_button("Run the imbalance experiment", type="primary", icon=":material/science:",
                                   disabled=job is not None or index is None)
    if index is None:
        st.caption("The experiment needs a dataset (see the Dataset page).")
    if job is not None:
        st.info("A training job is running; the experiment can start when it has finished.",
                icon=":material/hourglass_top:")
    if go:
        base = {"data": str(dataset_choice().folder), "arch": arch, "weights": weights_path.strip() or weights,
                "epochs": int(epochs),
                "input_size": [int(size), int(size)], "max_images": int(max_images) or None}
        try:
            from core.training import config_with

            base = {**config_with("seed", **base).to_dict(), "name": ""}
            started = jobs.start_experiment(base, RUNS)
        except jobs.JobBusyError as exc:
            st.error(str(exc), icon=":material/hourglass_top:")
        except (jobs.JobError, ValueError, OSError, ImportError) as exc:
            st.error(f"The experiment could not start: {exc}", icon=":material/block:")
        else:
            st.session_state["cmp_experiment"] = started.experiment
            st.rerun()


@st.fragment(run_every=2)
def experiment_status(manifest: dict) -> None:
    job = jobs.active_job(RUNS)
    rows, done = [], 0
    for name, strategy in zip(manifest["runs"], manifest.get("strategies", []), strict=False):
        path = RUNS / name
        run = read_run(path, job) if path.exists() else None
        state = run.state if run else ("queued" if job and name in job.runs else "not run")
        done += state in FINAL_STATES
        rows.append({"strategy": imbalance.label(strategy), "run": name, "state": state,
                     "progress": run.fraction_done() if run else 0.0,
                     "detail": run.progress_text() if run and not run.done else (run.error or "" if run else "")})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"progress": st.column_config.ProgressColumn(min_value=0, max_value=1)})
    running = job is not None and job.experiment == manifest["name"]
    if running:
        if job.stop_requested:
            st.warning("Stopping: the current run ends after its step; the queued ones will not start.",
                       icon=":material/stop_circle:")
        else:
            st.button("Stop the experiment", icon=":material/stop_circle:", key="exp_stop", on_click=jobs.stop_job,
                      args=(RUNS,))
    # Refill the comparison (a full rerun) whenever another run of the experiment has finished.
    seen_key = f"exp_done_{manifest['name']}"
    if st.session_state.get(seen_key, done) != done:
        st.session_state[seen_key] = done
        st.rerun()
    st.session_state[seen_key] = done


runs = evaluated_runs()
experiments = jobs.list_experiments(RUNS)
tab_cmp, tab_exp = st.tabs(["Compare runs", "Imbalance experiment"])

with tab_exp:
    experiment_form()
    if experiments:
        names = [e["name"] for e in experiments]
        current = st.session_state.get("cmp_experiment")
        pick = st.selectbox("Experiment", names, index=names.index(current) if current in names else 0,
                            key="cmp_experiment_pick")
        experiment_status(experiments[names.index(pick)])

with tab_cmp:
    if len(runs) < 2 and not list_runs():
        st.info("Comparing needs at least two finished runs. Train them on the Train page, or start the imbalance "
                "experiment (next tab), which trains one run per imbalance strategy for you.",
                icon=":material/science:")
    names = [r.name for r in runs]
    default = []
    if experiments:
        default = [n for n in experiments[0]["runs"] if n in names]
    if len(default) < 2:
        default = names[:2]
    chosen = st.multiselect("Runs", names, default=default, format_func=lambda n: run_label(runs[names.index(n)]),
                            key="cmp_runs")
    if len(chosen) >= 2:
        comparison([runs[names.index(n)] for n in chosen])
    elif runs:
        st.caption("Choose two or more runs.")
