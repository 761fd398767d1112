"""Diagnose: one uploaded image through one model. Uploads stay in memory; nothing is written to disk."""

import time
from datetime import UTC, datetime

import streamlit as st
from PIL import Image

from core.app import plots
from core.app.referral import referral_views
from core.app.report import model_info, report_html
from core.common.formatting import format_bytes
from core.common.labels import CLASSES, MALIGNANT
from core.data.images import ImageError, fit_margins, upright_size
from core.data.splits import SplitError
from core.inference.explain import feature_map_grid
from core.inference.forward import PredictionError
from core.inference.prediction import LOW_CONFIDENCE
from core.inference.similar import NEIGHBOURS, REFERENCE_SPLITS, disagreement_text, vote
from pages.views._shared import case_index, dark_theme, load_dataset, model_choice, progress_bar, research_notice

# Streamlit's max_upload_size counts MiB (× 1024² bytes), though its documentation says megabytes.
MAX_UPLOAD_MIB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MIB * 2**20

st.title("Diagnose")
research_notice()

predictor, model_path, tta = model_choice("diag")
ckpt = predictor.checkpoint
st.caption(
    f"{predictor.arch}, input {tuple(predictor.prep.input_size)}, temperature "
    f"{predictor.temperature:.2f}" + (f", trained for {ckpt['epoch']} epochs" if ckpt.get("epoch") else "")
)

metadata = None
encoding = predictor.metadata_encoding
if encoding is not None:
    with st.expander("Age, sex and body site (optional)"):
        st.caption(
            "This model also takes the patient's age, sex and the lesion's body site. Leave any of them empty "
            "when unknown: it was trained with each withheld at random, so it works without them."
        )
        c_age, c_sex, c_site = st.columns(3)
        metadata = {
            "age": c_age.number_input(
                "Age", 0, encoding.max_age, value=None, step=5, placeholder="unknown", key="diag_age"
            ),
            "sex": c_sex.selectbox("Sex", encoding.sexes, index=None, placeholder="unknown", key="diag_sex"),
            "site": c_site.selectbox("Body site", encoding.sites, index=None, placeholder="unknown", key="diag_site"),
        }
else:
    st.caption(
        "This model reads the image alone: age, sex and body site would not change its answer, so it does not ask "
        "for them. A model trained with `--metadata` asks for them here (MODEL_CARD.md, Metadata: why the bundled "
        "model does not take them)."
    )

upload = st.file_uploader(
    f"Dermoscopy image (JPEG or PNG, at most {format_bytes(MAX_UPLOAD_BYTES)})",
    type=["jpg", "jpeg", "png"],
    max_upload_size=MAX_UPLOAD_MIB,
    key="diag_upload",
)
if upload is None:
    st.info(
        "Upload a dermoscopic image of a pigmented lesion to see the model's prediction, its calibrated "
        "probabilities for all seven classes and where it looked.",
        icon=":material/upload:",
    )
    st.stop()
if upload.size > MAX_UPLOAD_BYTES:
    st.error(
        f"{upload.name} is {format_bytes(upload.size)}; the limit is {format_bytes(MAX_UPLOAD_BYTES)}.",
        icon=":material/block:",
    )
    st.stop()

# One prediction per (file, model, TTA, metadata), kept in the session only: reruns from the sliders reuse it.
key = (upload.file_id, str(model_path), tta, tuple((metadata or {}).items()))
cached = st.session_state.get("diag_result")
if cached is None or cached[0] != key:
    # One model serves every open session, one pass at a time: in a full room say so rather than freeze.
    ahead, waited_from = len(predictor.line), time.perf_counter()
    analyses = "analysis" if ahead == 1 else "analyses"
    waiting = st.empty()
    if ahead:
        waiting.info(
            f"{ahead} {analyses} ahead of yours: one model serves every open session, one image at a time.",
            icon=":material/hourglass_top:",
        )
    try:
        prediction = predictor.predict(upload.getvalue(), tta=tta, metadata=metadata)
    except ImageError as exc:
        st.error(f"This file cannot be used: {exc}", icon=":material/block:")
        st.stop()
    except PredictionError as exc:
        st.error(f"No diagnosis from this model: {exc}. Choose another model.", icon=":material/block:")
        st.stop()
    except Exception as exc:  # noqa: BLE001 — any decoder surprise must end in a message, not a traceback
        st.error(
            f"{upload.name} could not be read as an image ({type(exc).__name__}). Upload a JPEG or PNG photo.",
            icon=":material/block:",
        )
        st.stop()
    if ahead:
        waiting.caption(
            f"Your image waited behind {ahead} other {analyses} "
            f"({time.perf_counter() - waited_from:.1f} s in all with its own)."
        )
    st.session_state["diag_result"] = cached = (key, prediction)
    st.session_state.pop("diag_cam", None)
prediction = cached[1]
if encoding is not None:
    st.caption(prediction.metadata_note)

check = predictor.unfamiliar(prediction)
warnings = []
unfamiliar_reason = "This does not look like a dermoscopic image: " + "; ".join(check.reasons) + "."
if check.unfamiliar:
    warnings.append(
        unfamiliar_reason + " The model only knows dermoscopy of pigmented lesions, so it did not assess this image: "
        "no diagnosis, heatmap or similar cases are shown."
    )
    st.warning(warnings[-1], icon=":material/image_search:")
elif prediction.confidence < LOW_CONFIDENCE:  # a picture not assessed has no result to call undecided
    warnings.append(
        f"Low confidence: the most likely class has only {prediction.confidence:.0%}. Treat this result as undecided."
    )
    st.warning(warnings[-1], icon=":material/help:")
if not check.measured:
    st.caption(
        "This model has no measured unfamiliar-image detector that fits it (none saved beside it, one fitted for "
        "another version of the file, or a damaged one; `bench/similar.py` fits one), so only the colour check looked "
        "at whether this is dermoscopy."
    )


def probabilities() -> None:
    kind = "malignant" if prediction.top_class in MALIGNANT else "benign"
    st.markdown(
        f"**{prediction.confidence:.1%}** calibrated probability for {prediction.top_name} "
        f"({prediction.top_class}) · a {kind} class"
    )
    st.caption(
        "Calibrated means that across the validation images, results given about this probability were "
        "right about that often: an average over many images, not a promise about this one. A confident "
        "result can still be wrong: compare it with the similar confirmed cases below."
    )
    m1, m2 = st.columns(2)
    m1.metric("Malignant (akiec + bcc + mel)", f"{prediction.malignant_probability:.1%}")
    m2.metric("Benign (bkl + df + nv + vasc)", f"{1 - prediction.malignant_probability:.1%}")
    bars = plots.probability_bars(prediction.probs, highlight=prediction.top_class, dark=dark_theme())
    st.plotly_chart(bars, width="stretch")


def referrals(assessed: bool = True) -> None:
    """Each referral rule (any malignant class, melanoma): its probability against the model's threshold, with
    the refer cue at or above it when the image was ``assessed``; the help says how the threshold was set and what it
    measured."""
    views = referral_views(predictor.referrals, prediction, model_path, ckpt)
    for col, view in zip(st.columns(len(views)), views, strict=True):
        col.metric(view.label, view.p, help=view.note)
    if prediction.members is not None:  # an ensemble: how much its models agree, beside the number
        st.markdown(f"**{prediction.members.agreement_text()}**. {prediction.members.spread_text()}.")
        st.caption(
            "Each model's own calibrated answer. The number above combines them; where they disagree or their "
            "P(melanoma) spreads widely, it is less certain than it looks."
        )
    if not assessed:  # a verdict on a picture the model cannot read would be a finding about a class
        return
    for view in views:
        if view.refers:
            st.error(view.verdict, icon=":material/medical_services:")
        else:
            st.caption(view.verdict)


def member_heatmaps(votes, method: str, target: str, cam_key: tuple, alpha: float) -> None:
    """Each ensemble member's map beside the averaged one, named, with its P(predicted class). Off by default: K
    more maps cost K times the averaged one's time, so they are computed only once asked for, then kept per image,
    method and class."""
    from core.inference.explain import CAM_METHOD_NAMES, overlay

    shown = st.toggle(
        "Show each model's heatmap",
        key="diag_each_cam",
        help=f"The map above is the mean of the {votes.count} models' maps. Each model's own shows where they look "
        "alike and where they differ.",
    )
    if not shown:
        return
    cams = st.session_state.get("diag_member_cams")
    if cams is None or cams[0] != cam_key:
        try:
            with st.spinner(f"Computing the {votes.count} models' activation maps…"):
                maps = predictor.explain_members(prediction, method, target)
        except Exception as exc:  # noqa: BLE001
            st.error(f"The models' activation maps could not be computed ({type(exc).__name__}: {exc}).")
            maps = None
        st.session_state["diag_member_cams"] = cams = (cam_key, maps)
    if cams[1] is None:
        return
    top = prediction.top_class
    st.caption(
        f"{CAM_METHOD_NAMES[method]} for {target} by each of the {votes.count} models; the map above is their mean. "
        f"Under each: the model's own calibrated P({top}), the ensemble's predicted class."
    )
    per_row = min(3, votes.count)
    for start in range(0, votes.count, per_row):
        row = st.columns(per_row)
        for col, i in zip(row, range(start, min(start + per_row, votes.count)), strict=False):
            probs, own = votes.probs[i], votes.own_top_classes[i]
            caption = f"{votes.names[i]}: P({top}) {probs[CLASSES.index(top)]:.1%}"
            if own != top:
                caption += f"; its own top class {own} ({probs.max():.1%})"
            col.image(overlay(prediction.image, cams[1][i], alpha), caption=caption, width="stretch")


right, left = st.columns([6, 5], gap="large")  # prediction first, explanation beside it
with right:
    if not check.unfamiliar:
        st.markdown(f"### {prediction.top_name} ({prediction.top_class})")
        # Filled once the similar cases are found (below, so that they never hold up the answer).
        caveats = st.container()
        referrals()
        probabilities()
    else:
        # No diagnosis heading for a photo the model cannot read: the warning above is the result.
        with st.expander("The model's output anyway (not meaningful for this image)", expanded=False):
            referrals(assessed=False)
            probabilities()


def upload_caption() -> str:
    """What the shown upload is: brought to the training images' size, and what fitting its shape did."""
    size, (in_h, in_w) = predictor.prep.source_size, predictor.prep.input_size
    caption = (
        f"the upload brought to {size[0]}×{size[1]}, the size of this model's training images"
        if size
        else "the upload as decoded"
    ) + ("" if size and tuple(size) == (in_w, in_h) else f", before the resize to its {in_w}×{in_h} input")
    # An upload of another shape keeps its scale: say what was cut or mirrored, so the margins surprise nobody.
    shape = upright_size(upload.getvalue()) if size else None
    if shape and (fitted := fit_margins(shape, size)):
        caption += f"; {fitted}"
    return caption


def explanation() -> tuple[Image.Image | None, str]:
    """The upload beside its activation map for a chosen class (each ensemble member's on request); returns the
    overlay shown and its caption, for the report."""
    from core.inference.explain import CAM_METHOD_NAMES, overlay

    c1, c2 = st.columns(2)
    method = c1.selectbox(
        "Explanation method", list(CAM_METHOD_NAMES), format_func=CAM_METHOD_NAMES.get, key="diag_method"
    )
    # Keyed per prediction: a new image (or model) starts from its own predicted class, not the last one's.
    target = c2.selectbox(
        "For class",
        CLASSES,
        index=prediction.top_index,
        format_func=plots.class_label,
        key=f"diag_target_{hash(key)}",
        disabled=method == "eigencam",
        help="Eigen-CAM is class-agnostic." if method == "eigencam" else None,
    )
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="diag_alpha")
    cam_key = (key, method, target)
    cam = st.session_state.get("diag_cam")
    if cam is None or cam[0] != cam_key:
        try:
            with st.spinner("Computing the activation map…"):
                heat = predictor.explain(prediction, method, target)
        except Exception as exc:  # noqa: BLE001
            st.error(f"The activation map could not be computed ({type(exc).__name__}: {exc}).")
            heat = None
        st.session_state["diag_cam"] = cam = (cam_key, heat)
    images, captions = [prediction.image], [upload_caption()]
    shown = None if cam[1] is None else overlay(prediction.image, cam[1], alpha)
    label = f"{CAM_METHOD_NAMES[method]} for {target}"
    if shown is not None:
        images.append(shown)
        captions.append(label)
    for col, img, cap in zip(st.columns(len(images)), images, captions, strict=False):
        col.image(img, caption=cap, width="stretch")
    if prediction.members is not None:  # an ensemble: the map above is its models' mean; each one's on request
        member_heatmaps(prediction.members, method, target, cam_key, alpha)
    return shown, label


with left:
    if check.unfamiliar:
        # Not assessed: a map "for" any class would read as the model's finding about this picture.
        st.image(prediction.image, caption=upload_caption(), width="stretch")
        heatmap, heatmap_label = None, ""
    else:
        heatmap, heatmap_label = explanation()


def case_grid(cases: list, titles: list[str] | None = None, cols: int = 4) -> None:
    for i, case in enumerate(cases):
        if i % cols == 0:
            row = st.columns(cols)
        title = f"**{titles[i]}** · " if titles else ""
        row[i % cols].image(case.path, caption=title + case.caption(), width="stretch")


def index_progress(task, dataset_name: str) -> None:
    """The case index's bar, redrawn every second while it is built (the fragment is only drawn then, so an idle tab
    costs nothing); the whole page again once it is ready: the cases, what they say beside the answer, the report."""
    if task.finished:
        st.rerun()
    progress_bar(
        f"Indexing {dataset_name} under this model for similar cases ({task.stage})",
        task.done,
        task.total,
        task.started,
    )
    st.caption(
        "Once per model and dataset, in the background: the answer, the heatmap and the report do not wait for it. "
        "The similar cases appear here when the index is ready (download the report again then to include them)."
    )


def similar_cases() -> tuple[list, dict]:
    """The similar-cases section; returns what it showed (nearest cases, nearest by class) for the report."""
    st.subheader("Similar confirmed cases")
    dataset = load_dataset(show_help=False)
    if dataset is None:
        st.info(
            "Similar cases come from the configured dataset, and none is configured: choose a dataset folder "
            "in the sidebar.",
            icon=":material/photo_library:",
        )
        return [], {}
    task = case_index(model_path, ckpt, dataset)
    if not task.finished:  # the answer, heatmap and report do not wait: the cases follow when the index is ready
        st.fragment(index_progress, run_every=1)(task, dataset.root.name)
        return [], {}
    if task.error is not None:
        why = str(task.error) if isinstance(task.error, SplitError) else f"{type(task.error).__name__}: {task.error}"
        st.info(f"No similar cases: {why}", icon=":material/photo_library:")
        return [], {}
    cases = task.result
    with_test = st.toggle(
        "Include the model's test images",
        key="diag_similar_test",
        help="Test images were held out to measure the model; they are left out so that a test image "
        "uploaded here is not shown its own answer.",
    )
    splits = None if with_test else REFERENCE_SPLITS
    pool = len(cases.rows(splits))
    st.caption(
        f"The images of {dataset.root.name} nearest to this upload in the model's own features (cosine "
        f"similarity of the pooled backbone features), searched among {pool} "
        + ("images." if with_test else "of its training and validation images (its test images are left out).")
    )
    if pool == 0:
        st.info("None of this dataset's images is a training or validation image of this model.")
        return [], {}
    embedding = predictor.embed(prediction)
    nearest = cases.nearest(embedding, NEIGHBOURS, splits)
    shares = vote(nearest)
    votes = ", ".join(f"{round(p * len(nearest))} {c}" for c, p in zip(CLASSES, shares, strict=True) if p > 0)
    st.markdown(f"The {len(nearest)} nearest cases: {votes}.")
    by_class = cases.nearest_by_class(embedding, splits)
    tab_near, tab_class = st.tabs([f"Nearest {len(nearest)}", "By class"])
    with tab_near:
        case_grid(nearest)
    with tab_class:
        shown = {code: case for code, case in by_class.items() if case is not None}
        case_grid(list(shown.values()), [plots.class_label(code) for code in shown])
        missing = [code for code, case in by_class.items() if case is None]
        if missing:
            st.caption(f"No image of {', '.join(missing)} among the images searched.")
    return nearest, by_class


def disagreements(nearest: list) -> list[str]:
    """What to say beside the answer when its nearest confirmed cases or, for an ensemble, its models disagree with
    it (how often that marks a wrong answer: docs/BENCHMARKS.md, bench/disagreement.py)."""
    found = []
    if (text := disagreement_text(prediction.top_class, nearest)) is not None:
        found.append(text)
    votes = prediction.members
    if votes is not None and votes.agreeing < votes.count:
        found.append(
            f"The models disagree: {votes.agreement_text()}. The combined answer is less certain than its "
            "probability says."
        )
    return found


# A flagged image was not assessed: its nearest cases would read as a verdict on it (their diagnoses, "8 nv").
nearest, by_class = ([], {}) if check.unfamiliar else similar_cases()
if not check.unfamiliar:
    for text in disagreements(nearest):
        caveats.warning(text, icon=":material/call_split:")
        warnings.append(text)


def report() -> str:
    """The HTML report, built when the button is clicked: every rerun of a full room's Diagnose skips it, and it
    carries the moment of the download."""
    return report_html(
        prediction,
        model=model_info(model_path, ckpt, predictor.arch, tta=prediction.tta),
        created=datetime.now(UTC),
        heatmap=heatmap,
        heatmap_label=heatmap_label,
        warnings=warnings,
        cases=nearest,
        cases_by_class=by_class,
        referrals=referral_views(predictor.referrals, prediction, model_path, ckpt),
        not_assessed=unfamiliar_reason if check.unfamiliar else None,
        source_name=upload.name,
    )


st.download_button(
    "Download report",
    report,
    file_name=f"lesionlab-report-{datetime.now(UTC):%Y%m%d-%H%M%S}.html",
    mime="text/html",
    icon=":material/download:",
    key="diag_report",
    help="One HTML page with the image, the heatmap, all seven probabilities, the similar cases, the warnings "
    "and the model's measured performance. It is built when you click, from this page; nothing is kept on the server.",
)

with st.expander("Feature maps: what the network's layers respond to"):
    # An expander's body runs even when it is closed: the maps are a model pass of their own, so they are computed
    # only once asked for (a full room's Diagnoses must not each pay for a view few open), then kept per layer.
    if st.toggle("Show the feature maps", key="diag_show_layers"):
        layers = predictor.layer_names()
        layer = st.select_slider("Layer (shallow → deep)", layers, value=layers[len(layers) // 2], key="diag_layer")
        grid = st.session_state.get("diag_layer_maps")
        if grid is None or grid[0] != (key, layer):
            try:
                maps = predictor.feature_maps(prediction, layer)
                shown = (
                    feature_map_grid(maps, n=16),
                    f"the 16 most active of {len(maps)} channels of {layer} ({maps.shape[1]}×{maps.shape[2]})",
                )
            except ValueError as exc:
                shown = exc
            st.session_state["diag_layer_maps"] = grid = ((key, layer), shown)
        if isinstance(grid[1], ValueError):
            st.error(str(grid[1]))
        else:
            st.image(grid[1][0], caption=grid[1][1])

st.caption(
    "Probabilities are calibrated by temperature scaling on the validation split. The model saw only "
    "HAM10000 dermoscopy (downscaled to 200×150); it has never seen healthy skin, other diseases or "
    "clinical photos."
)
