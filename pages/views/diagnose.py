"""Diagnose: one uploaded image through one model. Uploads stay in memory; nothing is written to disk."""
import streamlit as st

from core import plots, settings
from core.formatting import format_bytes
from core.images import ImageError
from core.inference import PredictionError
from core.labels import CLASSES, MALIGNANT
from core.visuals import LOW_CONFIDENCE, dermoscopy_check, feature_map_grid
from pages.views._shared import get_predictor, research_notice

# Streamlit's max_upload_size counts MiB (× 1024² bytes), though its documentation says megabytes.
MAX_UPLOAD_MIB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MIB * 2**20

st.title("Diagnose")
research_notice()

models = settings.model_files()
if not models:
    st.info("No model is available. Diagnose uses `checkpoints/*.pt` (the repository ships "
            "`checkpoints/reference.pt`) and the `best.pt` of every finished training run: train one on the "
            "**Train** page, or copy a Lesion Lab checkpoint into `checkpoints/`.", icon=":material/neurology:")
    st.stop()

c_model, c_tta = st.columns([3, 1])
model_path = c_model.selectbox("Model", models, format_func=settings.model_label, key="diag_model")
tta = c_tta.toggle("Flip averaging (TTA)", key="diag_tta",
                   help="Average the prediction over the image and its three flips (4 passes).")
predictor, error = get_predictor(model_path)
if predictor is None:
    st.error(f"This model cannot be used: {error}", icon=":material/block:")
    st.stop()
ckpt = predictor.checkpoint
st.caption(f"{predictor.arch}, input {tuple(predictor.prep.input_size)}, temperature "
           f"{predictor.temperature:.2f}" + (f", trained for {ckpt['epoch']} epochs" if ckpt.get("epoch") else ""))

upload = st.file_uploader(f"Dermoscopy image (JPEG or PNG, at most {format_bytes(MAX_UPLOAD_BYTES)})",
                          type=["jpg", "jpeg", "png"], max_upload_size=MAX_UPLOAD_MIB, key="diag_upload")
if upload is None:
    st.info("Upload a dermoscopic image of a pigmented lesion to see the model's prediction, its calibrated "
            "probabilities for all seven classes and where it looked.", icon=":material/upload:")
    st.stop()
if upload.size > MAX_UPLOAD_BYTES:
    st.error(f"{upload.name} is {format_bytes(upload.size)}; the limit is {format_bytes(MAX_UPLOAD_BYTES)}.",
             icon=":material/block:")
    st.stop()

# One prediction per (file, model, TTA), kept in the session only: reruns from the sliders reuse it.
key = (upload.file_id, str(model_path), tta)
cached = st.session_state.get("diag_result")
if cached is None or cached[0] != key:
    try:
        prediction = predictor.predict(upload.getvalue(), tta=tta)
    except ImageError as exc:
        st.error(f"This file cannot be used: {exc}", icon=":material/block:")
        st.stop()
    except PredictionError as exc:
        st.error(f"No diagnosis from this model: {exc}. Choose another model.", icon=":material/block:")
        st.stop()
    except Exception as exc:  # noqa: BLE001 — any decoder surprise must end in a message, not a traceback
        st.error(f"{upload.name} could not be read as an image ({type(exc).__name__}). Upload a JPEG or PNG "
                 "photo.", icon=":material/block:")
        st.stop()
    st.session_state["diag_result"] = cached = (key, prediction)
    st.session_state.pop("diag_cam", None)
prediction = cached[1]

check = dermoscopy_check(prediction.image)
if not check.looks_dermoscopic:
    st.warning("This does not look like a dermoscopic image: " + "; ".join(check.reasons) + ". The model "
               "only knows dermoscopy of pigmented lesions, so its output here means little.",
               icon=":material/image_search:")
if prediction.confidence < LOW_CONFIDENCE:
    st.warning(f"Low confidence: the most likely class has only {prediction.confidence:.0%}. Treat this "
               "result as undecided.", icon=":material/help:")

right, left = st.columns([6, 5], gap="large")  # prediction first, explanation beside it
with right:
    kind = "malignant" if prediction.top_class in MALIGNANT else "benign"
    st.markdown(f"### {prediction.top_name} ({prediction.top_class})")
    st.markdown(f"**{prediction.confidence:.1%}** calibrated probability · a {kind} class")
    m1, m2 = st.columns(2)
    m1.metric("Malignant (akiec + bcc + mel)", f"{prediction.malignant_probability:.1%}")
    m2.metric("Benign (bkl + df + nv + vasc)", f"{1 - prediction.malignant_probability:.1%}")
    st.plotly_chart(plots.probability_bars(prediction.probs, highlight=prediction.top_class), width="stretch")

with left:
    from core.explain import CAM_METHOD_NAMES, overlay

    c1, c2 = st.columns(2)
    method = c1.selectbox("Explanation method", list(CAM_METHOD_NAMES), format_func=CAM_METHOD_NAMES.get,
                          key="diag_method")
    target = c2.selectbox("For class", CLASSES, index=prediction.top_index, format_func=plots.class_label,
                          key="diag_target", disabled=method == "eigencam",
                          help="Eigen-CAM is class-agnostic." if method == "eigencam" else None)
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
    images = [prediction.image]
    captions = ["uploaded image (as the model sees it, before resizing)"]
    if cam[1] is not None:
        images.append(overlay(prediction.image, cam[1], alpha))
        captions.append(f"{CAM_METHOD_NAMES[method]} for {target}")
    for col, img, cap in zip(st.columns(len(images)), images, captions, strict=False):
        col.image(img, caption=cap, width="stretch")

with st.expander("Feature maps: what the network's layers respond to"):
    layers = predictor.layer_names()
    layer = st.select_slider("Layer (shallow → deep)", layers, value=layers[len(layers) // 2], key="diag_layer")
    try:
        maps = predictor.feature_maps(prediction, layer)
        st.image(feature_map_grid(maps, n=16), caption=f"the 16 most active of {len(maps)} channels of {layer} "
                                                       f"({maps.shape[1]}×{maps.shape[2]})")
    except ValueError as exc:
        st.error(str(exc))

st.caption("Probabilities are calibrated by temperature scaling on the validation split. The model saw only "
           "HAM10000 dermoscopy (downscaled to 200×150); it has never seen healthy skin, other diseases or "
           "clinical photos.")
