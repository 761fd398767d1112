"""Every page renders, without a dataset/model/run and with them (streamlit.testing AppTest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from core.common.labels import CLASSES, MELANOMA
from core.common.settings import PUBLISHED_RUNS_ENV
from core.models.architectures import default_arch
from core.training.imbalance import STRATEGIES
from pages.views import _pages
from tests.app_support import *  # noqa: F403
from tests.app_support import PAGES, ROOT, AppEnv, app_test, no_exceptions, table_fits_1600, texts, use_folder

EMPTY_MESSAGES = {
    "home": "No dataset is configured",
    "dataset": "No dataset is configured",
    "train": "No dataset is configured",
    "evaluate": "no finished run to evaluate",
    "diagnose": "No model is available",
    "batch": "No model is available",
    "compare": "Comparing needs at least two finished runs",
    "quiz": "No dataset is configured",
}


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_anything(page, empty_env, monkeypatch):
    empty_env.apply(monkeypatch)
    at = app_test(page)
    no_exceptions(at)
    text = texts(at)
    assert EMPTY_MESSAGES[page] in text
    # The entry point's sidebar is on every page: the notice and the dataset setting's state.
    assert "not a medical device" in text and "No dataset configured" in text
    at.run()  # and stays there on reruns
    assert "not a medical device" in texts(at)


def test_the_page_list_covers_every_page_script():
    scripts = sorted(Path(p.script) for p in _pages.PAGES)
    assert scripts == sorted(p.relative_to(ROOT) for p in (ROOT / "pages" / "views").glob("[!_]*.py"))
    assert [p.title for p in _pages.PAGES if p.default] == ["Home"]


def test_every_page_but_home_has_its_stand_in_for_a_fresh_servers_first_request():
    """See pages/views/_entry.py: a bookmarked page opened first after a restart is looked up in pages/*.py."""
    expected = {f"{Path(p.script).stem}.py" for p in _pages.PAGES if not p.default}
    assert {p.name for p in (ROOT / "pages").glob("*.py")} == expected
    for name in expected:
        assert "run_app()" in (ROOT / "pages" / name).read_text()


def test_home_links_every_other_page_from_the_page_list(empty_env, monkeypatch):
    empty_env.apply(monkeypatch)
    at = app_test("home")
    no_exceptions(at)
    others = [p for p in _pages.PAGES if not p.default]
    links = sorted((link.proto.page, link.proto.label, link.proto.icon) for link in at.get("page_link"))
    assert links == sorted((Path(p.script).stem, f"**{p.title}**", p.icon) for p in others)
    captions = [c.value for c in at.caption]
    assert all(p.description in captions for p in others)


def charts(at) -> int:
    return len(at.get("plotly_chart"))


def test_home_with_data(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("home")
    no_exceptions(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dataset images"] == "84"
    assert metrics["Models for Diagnose"] == "3"  # reference.pt + two runs' best.pt
    assert metrics["Training runs"] == "2"
    assert "Research and education only" in texts(at)


def test_home_counts_finished_runs_and_the_published_ones_apart(full_env, tmp_path, monkeypatch):
    from core.common.runs import write_status

    runs = tmp_path / "runs"
    shutil.copytree(full_env.runs / "tiny-none", runs / "tiny-none")
    (runs / "crashed").mkdir()
    write_status(runs / "crashed", "failed", "RuntimeError: out of memory")
    published = ROOT / "docs" / "runs"
    AppEnv(data=full_env.data, runs=runs, checkpoints=full_env.checkpoints).apply(monkeypatch)
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(published))
    at = app_test("home")
    no_exceptions(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Training runs"] == "1"
    assert "1 failed" in texts(at)
    assert metrics["Published runs"] == str(len([d for d in published.iterdir() if (d / "status.json").is_file()]))


def test_dataset_with_data(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("dataset")
    no_exceptions(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "84" and metrics["Imbalance ratio"] == "1.0 : 1"
    # Only the open tab is computed: the class distribution, not the metadata charts or the gallery's images.
    assert charts(at) == 1 and not at.get("image")
    at.radio(key="dist_scale").set_value("log").run()
    no_exceptions(at)
    assert "Get HAM10000" in [e.label for e in at.expander]  # 84 images are not all of HAM10000

    open_view(at, "Metadata", "dataset_view")
    assert charts(at) == 4  # age, sex, localization, dx_type

    open_view(at, "Validation report", "dataset_view")
    assert any("No problems" in s.value for s in at.success)

    open_view(at, "Gallery", "dataset_view")
    assert len(at.get("image")) == 12  # the gallery shows the 12 images of the first class
    at.selectbox(key="gallery_class").set_value("mel").run()
    no_exceptions(at)
    assert any("images of Melanoma match" in c.value for c in at.caption)
    at.multiselect(key="gallery_sex").set_value(["female"]).run()
    no_exceptions(at)
    assert any("4 images of Melanoma match" in c.value for c in at.caption)


def test_dataset_gallery_lays_out_a_row_of_columns_per_row_of_images(full_env, monkeypatch):
    """A grid whose rows line up whatever the captions: each row of six images is its own set of columns, so
    no column holds two images (one long caption would push that column's later images out of line)."""
    full_env.apply(monkeypatch)
    at = app_test("dataset")
    open_view(at, "Gallery", "dataset_view")
    images = [len(col.get("image")) for col in at.columns]
    assert sum(images) == 12 and max(images) == 1


def test_metadata_bars_can_show_each_category_as_shares(full_env, monkeypatch):
    """Stacked counts hide the small classes beside nv; per-category normalisation shows each as its share."""
    full_env.apply(monkeypatch)
    at = app_test("dataset")
    open_view(at, "Metadata", "dataset_view")

    def stacked() -> list[dict]:
        specs = [json.loads(c.proto.spec)["layout"] for c in at.get("plotly_chart")]
        return [layout for layout in specs if layout.get("barmode") == "stack"]

    assert len(stacked()) == 3 and not any(layout.get("barnorm") for layout in stacked())
    at.toggle(key="meta_share").set_value(True).run()
    no_exceptions(at)
    assert len(stacked()) == 3 and all(layout.get("barnorm") == "percent" for layout in stacked())


def test_metadata_shows_images_per_source_and_class_when_the_sources_are_known(
    tiny_root, empty_env, monkeypatch, tmp_path
):
    """With HAM10000_sources.csv beside the metadata, the Metadata tab adds the source chart and its table."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    ids = pd.read_csv(root / "HAM10000_metadata.csv")["image_id"]
    pd.DataFrame({"image_id": ids, "dataset": ["rosendahl", "vidir_modern"] * (len(ids) // 2)}).to_csv(
        root / "HAM10000_sources.csv", index=False
    )
    AppEnv(data=root, runs=empty_env.runs, checkpoints=empty_env.checkpoints).apply(monkeypatch)
    at = app_test("dataset")
    open_view(at, "Metadata", "dataset_view")
    assert charts(at) == 5
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "Image source (camera or clinic)" in titles
    table = at.dataframe[0].value
    assert sorted(table.index) == ["rosendahl", "vidir_modern"] and int(table.to_numpy().sum()) == len(ids)


def test_split_preview_says_which_split_the_trainer_uses(full_env, monkeypatch):
    """The preview opens on the trainer's own split and says so; moved sliders are a preview, with the command
    line that would train on it (the Train page has no such settings)."""
    full_env.apply(monkeypatch)
    at = app_test("dataset")
    open_view(at, "Split preview", "dataset_view")
    text = texts(at)
    assert "This is the split every run trained from the app uses (70%, 15%, 15% with split seed 0)" in text
    assert "This is the split the trainer uses" not in text
    at.slider(key="split_test").set_value(0.2).run()
    no_exceptions(at)
    text = texts(at)
    assert "A preview only" in text and "--split-fractions 0.65 0.15 0.20 --split-seed 0" in text


def test_dataset_page_offers_no_download_when_all_of_ham10000_is_there(ham_root, empty_env, monkeypatch):
    AppEnv(data=ham_root, runs=empty_env.runs, checkpoints=empty_env.checkpoints).apply(monkeypatch)
    at = app_test("dataset", timeout=120)
    no_exceptions(at)
    assert {m.label: m.value for m in at.metric}["Images"] == "10,015"
    assert "Get HAM10000" not in [e.label for e in at.expander]


def test_dataset_with_a_bad_folder(monkeypatch, tmp_path, empty_env):
    empty_env.apply(monkeypatch)
    monkeypatch.setenv("LESIONLAB_DATA", str(tmp_path / "nowhere"))
    at = app_test("dataset")
    no_exceptions(at)
    assert "cannot be used" in texts(at) and "does not exist" in texts(at)
    # The sidebar says so too, instead of "Using nowhere".
    use_folder(at, "nonexistent-folder")
    sidebar = [w.value for w in at.sidebar.warning] + [c.value for c in at.sidebar.caption]
    assert any(s.endswith("nonexistent-folder** does not exist (set by the sidebar).") for s in sidebar), sidebar
    assert not any("Using" in s for s in sidebar)


def test_sidebar_folder_overrides_the_environment(full_env, empty_env, monkeypatch):
    empty_env.apply(monkeypatch)
    at = app_test("home")
    assert "No dataset is configured" in texts(at)
    use_folder(at, str(full_env.data))
    no_exceptions(at)
    assert {m.label: m.value for m in at.metric}["Dataset images"] == "84"
    at.switch_page("pages/views/dataset.py").run()  # the setting holds on every page
    no_exceptions(at)
    assert {m.label: m.value for m in at.metric}["Images"] == "84"


def test_train_with_data_shows_form_and_runs(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("train")
    no_exceptions(at)
    assert at.selectbox(key="train_preset").value == "seed"
    # The preset's ResNet-18, or a backbone whose ImageNet file is on this computer when its file is not.
    assert at.selectbox(key="arch_seed").value == default_arch("resnet18")
    assert at.number_input(key="epochs_seed").value == 10
    start = [b for b in at.button if b.label == "Start training"]
    assert start and not start[0].disabled
    # No job: the latest run's outcome and its curves.
    assert at.selectbox(key="train_show_run").value in ("tiny-none", "tiny-weighted")
    assert any("Finished" in s.value for s in at.success)
    assert charts(at) == 1


def test_evaluate_with_a_run(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("evaluate")
    no_exceptions(at)
    assert {"Accuracy", "Balanced accuracy", "Macro F1", "Temperature"} <= {m.label for m in at.metric}
    # Only the open view is computed: the confusion matrix and the per-class report, nothing of the others.
    assert charts(at) == 1
    assert len(at.dataframe) == 1  # per-class report
    # Room for the longest diagnosis name in full ("Actinic keratosis / intraepithelial carcinoma" draws 290 px in
    # Chromium, Streamlit's "medium" column is 200).
    report = json.loads(at.dataframe[0].proto.columns)
    assert report["diagnosis"]["width"] >= 300
    assert "Sensitivity" not in {m.label for m in at.metric} and not at.get("image")
    at.segmented_control(key="eval_cm_mode").set_value("row-normalised").run()
    no_exceptions(at)
    for view, title in (("ROC curves", "ROC"), ("Calibration", "Reliability")):
        open_view(at, view)
        assert charts(at) == 1 and title in json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"]
    open_view(at, "Referral thresholds")
    assert {"Sensitivity", "Specificity"} <= {m.label for m in at.metric}

    # The threshold tab's rates, recomputed from the run's prediction file at each slider position.
    table = pd.read_csv(full_env.runs / at.selectbox(key="eval_run").value / "test_predictions.csv")
    mel = table["label"] == CLASSES.index(MELANOMA)

    def rates(t: float) -> tuple[float, float]:
        flagged = table["prob_mel"] >= t
        return flagged[mel].mean(), (~flagged[~mel]).mean()

    def shown() -> tuple[str, str]:
        values = {m.label: m.value for m in at.metric}
        return values["Sensitivity"], values["Specificity"]

    # The slider starts at the run's own operating point (chosen on its validation split), as Diagnose uses it.
    recorded = json.loads((full_env.runs / at.selectbox(key="eval_run").value / "evaluation.json").read_text())
    start = recorded.get("mel_threshold", 0.5)
    assert at.select_slider(key="eval_melanoma_t").value == start
    assert shown() == tuple(f"{r:.1%}" for r in rates(start))
    if "mel_threshold" in recorded:
        assert f"P(melanoma) ≥ {recorded['mel_threshold']:.3f}" in " ".join(c.value for c in at.caption)
    for t in (0.01, 0.99):
        at.select_slider(key="eval_melanoma_t").set_value(t).run()
        no_exceptions(at)
        assert shown() == tuple(f"{r:.1%}" for r in rates(t)), t
    # Lowering the threshold flags more images: more melanomas found, fewer non-melanomas cleared.
    (sens_low, spec_low), (sens_high, spec_high) = rates(0.01), rates(0.99)
    assert sens_low > sens_high and spec_low < spec_high
    # The malignant rule: the summed probability of akiec, bcc and mel against the lesions of those classes.
    at.segmented_control(key="eval_rule").set_value("malignant").run()
    no_exceptions(at)
    malignant = table["label"].isin([CLASSES.index(c) for c in ("akiec", "bcc", "mel")])
    score = table[["prob_akiec", "prob_bcc", "prob_mel"]].sum(axis=1)
    t = at.select_slider(key="eval_malignant_t").value
    assert t == recorded.get("malignant_threshold", 0.5)
    flagged = score >= t
    assert shown() == (f"{flagged[malignant].mean():.1%}", f"{(~flagged[~malignant]).mean():.1%}")
    at.selectbox(key="eval_run").set_value("tiny-weighted").run()
    no_exceptions(at)


@pytest.mark.parametrize("folder", ["/proc", "/"])
def test_dataset_page_with_a_system_folder_shows_why_it_cannot_be_used(folder, empty_env, monkeypatch):
    AppEnv(data=Path(folder), runs=empty_env.runs, checkpoints=empty_env.checkpoints).apply(monkeypatch)
    at = app_test("dataset")
    no_exceptions(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and f"The dataset folder {folder}" in errors[0] and "cannot be used" in errors[0], errors
    assert not at.metric  # no numbers for a folder that is not a dataset


def open_view(at, view: str, key: str = "eval_view") -> None:
    """Click the tab ``view`` of the lazily computed tabs ``key`` (what a click does: set it and rerun)."""
    at.session_state[key] = view
    at.run()
    no_exceptions(at)


def test_evaluate_gallery_shows_gradcam(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("evaluate")
    no_exceptions(at)
    open_view(at, "Misclassified images")
    wrong = [c for c in at.caption if "misclassified images" in c.value]
    assert wrong, "the gallery caption is missing"
    assert len(at.get("image")) == 8  # one page of the gallery


def test_diagnose_with_a_checkpoint_waits_for_an_upload(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("diagnose")
    no_exceptions(at)
    assert at.selectbox(key="diag_model").value.name == "reference.pt"
    assert len(at.get("file_uploader")) == 1
    assert "Upload a dermoscopic image" in texts(at)
    assert "not a medical device" in texts(at)


def test_compare_with_two_runs(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("compare")
    no_exceptions(at)
    assert sorted(at.multiselect(key="cmp_runs").value) == ["tiny-none", "tiny-weighted"]
    assert sorted(at.dataframe[0].value.index) == ["tiny-none", "tiny-weighted"]  # headline: a row per run
    # Every column within a 1600-px window, the run names wrapping in theirs (the names and ECE were cut).
    headline = table_fits_1600(at.dataframe[0])
    assert headline["_index"]["width"] >= 180 and "ECE" in headline
    assert charts(at) == 3  # per-class bars + two confusion matrices
    at.segmented_control(key="cmp_metric").set_value("f1").run()
    no_exceptions(at)
    per_class = at.dataframe[1].value  # the per-class table shows the chosen metric, a row per run
    table_fits_1600(at.dataframe[1])
    for run in ("tiny-none", "tiny-weighted"):
        evaluation = json.loads((full_env.runs / run / "evaluation.json").read_text())
        assert list(per_class.loc[run]) == pytest.approx([row["f1"] for row in evaluation["test"]["per_class"]])
    # The experiment tab's form is there (its button is enabled: data present, no job).
    button = [b for b in at.button if b.label == "Run the imbalance experiment"]
    assert button and not button[0].disabled


def test_published_runs_show_on_a_fresh_clone(empty_env, monkeypatch):
    """With no local runs, Evaluate and Compare show the run records published with the model card."""
    empty_env.apply(monkeypatch)
    published = ROOT / "docs" / "runs"
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(published))
    at = app_test("evaluate")
    no_exceptions(at)
    at.selectbox(key="eval_run").set_value("reference-mnv2").run()
    no_exceptions(at)
    accuracy = json.loads((published / "reference-mnv2" / "evaluation.json").read_text())["test"]["accuracy"]
    assert f"{accuracy:.3f}" in texts(at)
    assert "published with the model card" in at.selectbox(key="eval_run").format_func("reference-mnv2")

    # At its own melanoma threshold (0.1567): one view of each image, as this page shows them, the trainer's record;
    # averaging the flips, as Diagnose and its report quote it, the evaluate report's. The slider used to open on
    # 0.16, which cleared three more benign lesions (specificity 86.5 % where the record says 86.2 %).
    open_view(at, "Referral thresholds")
    one_view = json.loads((published / "reference-mnv2" / "evaluation.json").read_text())["test"]["melanoma"]
    flips = json.loads((published / "reference-mnv2" / "evaluate-test.json").read_text())["metrics"]["melanoma"]
    assert at.select_slider(key="eval_melanoma_t").value == one_view["threshold"] == flips["threshold"]
    shown = {m.label: m.value for m in at.metric}
    assert (shown["Sensitivity"], shown["Specificity"]) == (
        f"{one_view['sensitivity']:.1%}",
        f"{one_view['specificity']:.1%}",
    )
    assert f"it found {flips['sensitivity']:.1%} and cleared {flips['specificity']:.1%} there" in texts(at)

    at = app_test("compare")
    no_exceptions(at)
    assert len(at.multiselect(key="cmp_runs").options) == len(list(published.iterdir()))


def test_published_gallery_finds_its_images_by_id_in_the_configured_dataset(
    empty_env, tiny_root, tmp_path, monkeypatch
):
    """A published record on another computer: its misclassified images come from the dataset configured there
    (the bundled sample holds some of the reference model's test images), and a dataset without them is said
    to be so, plainly, instead of a tile per missing file."""
    from core.data.dataset import index_dataset

    sample = ROOT / "sample_data" / "ham10000-sample"
    published = ROOT / "docs" / "runs"
    AppEnv(data=sample, runs=empty_env.runs, checkpoints=empty_env.checkpoints).apply(monkeypatch)
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(published))
    monkeypatch.chdir(tmp_path)  # nothing may depend on where the record was written
    at = app_test("evaluate")
    at.selectbox(key="eval_run").set_value("reference-mnv2").run()
    open_view(at, "Misclassified images")

    table = pd.read_csv(published / "reference-mnv2" / "test_predictions.csv")
    probs = table[[f"prob_{c}" for c in CLASSES]].to_numpy()
    wrong = table[probs.argmax(axis=1) != table["label"]]
    here = wrong["image_id"].isin(index_dataset(sample).frame["image_id"])
    assert 0 < here.sum() < len(wrong)
    text = texts(at)
    assert f"{here.sum()} misclassified images, most confident mistakes first" in text
    assert f"{(~here).sum()} of the {len(wrong)} misclassified images are not in the configured dataset" in text
    assert len(at.get("image")) == min(8, here.sum()) and not at.warning

    use_folder(at, str(tiny_root))
    no_exceptions(at)
    assert "The images are not available here" in texts(at) and "ham10000-200x150" in texts(at)
    assert not at.get("image") and not at.warning

    monkeypatch.setenv("LESIONLAB_DATA", "")  # no dataset at all
    at = app_test("evaluate")
    at.selectbox(key="eval_run").set_value("reference-mnv2").run()
    open_view(at, "Misclassified images")
    assert "The images are not available here: no dataset" in texts(at).replace("**", "") and not at.get("image")


def test_compare_opens_on_the_imbalance_lesson_of_the_published_runs(empty_env, monkeypatch):
    """A fresh clone: the lesson is the first tab, on the published strategy runs, and its sentences say what
    its table and heatmap show."""
    empty_env.apply(monkeypatch)
    published = ROOT / "docs" / "runs"
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(published))
    at = app_test("compare")
    no_exceptions(at)
    assert [t.label for t in at.tabs] == ["Imbalance lesson", "Compare runs"]
    assert at.selectbox(key="cmp_experiment_pick").value.startswith("published:")
    sentence = (
        "Compared with none (plain cross-entropy), weighted loss raised melanoma recall from 0.29 to 0.49 and "
        "cut its precision from 0.54 to 0.31; nevus recall fell from 0.92 to 0.70."
    )
    assert sentence in texts(at)
    # The numbers table: a column per strategy, short labels, in the registry's order.
    [shown] = [d.value for d in at.dataframe if "weighted loss" in d.value.columns]
    labels = [STRATEGIES[s].label for s in STRATEGIES if (published / f"compare-mobilenet_v2-{s}").is_dir()]
    assert list(shown.columns) == labels
    for row, before, after in (
        ("recall · mel", "0.29", "0.49"),
        ("precision · mel", "0.54", "0.31"),
        ("recall · nv", "0.92", "0.70"),
    ):
        assert (shown.loc[row, "none"], shown.loc[row, "weighted loss"]) == (before, after), row
    # The heatmap shows the same numbers, a row per strategy and a column per class.
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    charts = {spec["layout"]["title"]["text"]: spec for spec in specs}
    assert {
        "Recall and precision of each class",
        "Melanoma recall vs precision",
        "Accuracy vs balanced accuracy",
    } <= set(charts)
    recall = charts["Recall and precision of each class"]["data"][0]
    assert recall["y"] == labels and recall["x"] == list(CLASSES)
    mel = list(CLASSES).index(MELANOMA)
    assert [row[mel] for row in recall["text"]] == list(shown.loc["recall · mel"])


def test_experiment_form_estimates_its_time_before_the_click(full_env, monkeypatch):
    from core.app import estimate
    from core.common.formatting import format_duration
    from core.common.runs import list_runs
    from core.common.settings import resolve_path
    from core.inference.features import FeatureCache, backbone_key
    from core.training.config import config_with

    full_env.apply(monkeypatch)
    at = app_test("compare")
    no_exceptions(at)
    at.selectbox(key="exp_arch").set_value("resnet18")  # the seed's, whatever backbone the form starts with here
    at.number_input(key="exp_epochs").set_value(3).run()
    no_exceptions(at)
    # What the page says is the estimate of core.app.estimate for the form's settings and this machine's runs.
    cfg = config_with("seed", data=str(full_env.data), epochs=3)
    total, images = estimate.experiment_images(cfg, list(STRATEGIES))
    rates = {**estimate.benchmark_rates(), **estimate.recorded_rates(list_runs(full_env.runs), cfg)}
    guess = estimate.estimate(images, total, 3, rates)
    assert rates["head_images_per_s"].basis == "2 earlier cached head-only resnet18 runs here"
    cached = FeatureCache(resolve_path(cfg.cache_dir)).path(backbone_key("resnet18", "imagenet", cfg.preprocessing))
    total_s = guess.cached_s if cached.is_file() else guess.cached_s + guess.features_s
    text = texts(at)
    assert f"Estimated time: about {format_duration(total_s)}" in text
    assert f"{len(STRATEGIES)} runs × 3 epochs on 84 images" in text
    assert "2 earlier cached head-only resnet18 runs here" in text and "bench/experiment.py" in text
    assert not [b for b in at.button if b.label == "Run the imbalance experiment"][0].disabled


@pytest.mark.integration
def test_the_newest_experiment_trained_here_is_the_lesson(tiny_root, tmp_path, monkeypatch):
    """An experiment run as the app runs it (one background job) becomes the lesson, before the published one."""
    from core.app import jobs as app_jobs
    from tests.app_support import AppEnv, tiny_config

    env = AppEnv(data=tiny_root, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(ROOT / "docs" / "runs"))
    base = tiny_config(tiny_root, "", epochs=1, cache_dir=str(tmp_path / "cache"))
    app_jobs.start_experiment(base, env.runs, name="exp", strategies=("weighted_loss", "none"))
    try:
        assert app_jobs.wait_idle(env.runs, timeout=180)
    finally:
        app_jobs.kill_job(env.runs)
    at = app_test("compare")
    no_exceptions(at)
    assert at.selectbox(key="cmp_experiment_pick").value == "exp"
    assert at.selectbox(key="cmp_experiment_pick").options[-1].startswith("published with the model card")
    [shown] = [d.value for d in at.dataframe if "weighted loss" in d.value.columns]
    assert list(shown.columns) == ["none", "weighted loss"]  # the registry's order, whatever the manifest's
    evaluation = json.loads((env.runs / "exp-weighted_loss" / "evaluation.json").read_text())["test"]
    mel = next(c for c in evaluation["per_class"] if c["code"] == MELANOMA)
    assert shown.loc["recall · mel", "weighted loss"] == f"{mel['recall']:.2f}"
    assert "Compared with none (plain cross-entropy), weighted loss" in texts(at)


def test_damaged_runs_are_listed_with_the_reason_and_never_drawn(full_env, tmp_path, monkeypatch):
    """A run whose evaluation.json claims an accuracy of 5 and one whose config.json nests past the JSON parser: before
    the run files' schemas the first was drawn with "5.000" on Evaluate and Compare and the second raised
    RecursionError on every page that lists runs."""
    runs = tmp_path / "runs"
    for name in ("tiny-none", "tiny-weighted"):
        shutil.copytree(full_env.runs / name, runs / name)
    shutil.copytree(full_env.runs / "tiny-none", runs / "tiny-inflated")
    evaluation = json.loads((runs / "tiny-inflated" / "evaluation.json").read_text())
    evaluation["test"]["accuracy"] = 5.0
    (runs / "tiny-inflated" / "evaluation.json").write_text(json.dumps(evaluation))
    shutil.copytree(full_env.runs / "tiny-none", runs / "tiny-nested")
    (runs / "tiny-nested" / "config.json").write_text("[" * 30_000 + "]" * 30_000)
    inflated = "evaluation.json is not a run's evaluation: test.accuracy must be a probability from 0 to 1; got 5.0"
    nested = "config.json is not a run's config: it nests deeper than 3 levels"
    AppEnv(data=full_env.data, runs=runs, checkpoints=full_env.checkpoints).apply(monkeypatch)

    home = app_test("home")
    no_exceptions(home)
    assert {m.label: m.value for m in home.metric}["Training runs"] == "2"
    assert "2 damaged" in texts(home)
    listed = home.dataframe[0].value.set_index("run")
    assert (listed.loc["tiny-inflated", "state"], listed.loc["tiny-inflated", "why"]) == ("damaged", inflated)
    assert listed.loc["tiny-nested", "why"] == nested

    for page in ("evaluate", "compare"):
        at = app_test(page)
        no_exceptions(at)
        shown = at.selectbox(key="eval_run").options if page == "evaluate" else at.multiselect(key="cmp_runs").options
        assert sorted(option.split(" ")[0] for option in shown) == ["tiny-none", "tiny-weighted"], page
        warning = "\n".join(str(w.value) for w in at.warning)
        assert f"**tiny-inflated**: {inflated}" in warning and f"**tiny-nested**: {nested}" in warning, page
        assert "5.000" not in texts(at)

    train = app_test("train")
    no_exceptions(train)
    train.selectbox(key="train_show_run").set_value("tiny-inflated").run()
    no_exceptions(train)
    assert f"This run's records are damaged, so Evaluate and Compare leave it out: {inflated}" in texts(train)
