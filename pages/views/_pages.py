"""The app's pages, listed once: ``streamlit_app.py`` builds the navigation from them, Home its page cards."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageInfo:
    script: str  # relative to the project root, as st.Page and st.page_link take it
    title: str
    icon: str
    description: str  # one line, on Home's card
    default: bool = False


PAGES: tuple[PageInfo, ...] = (
    PageInfo(
        "pages/views/home.py",
        "Home",
        ":material/home:",
        "What is ready to use: the dataset, the models, the training runs and the running job.",
        default=True,
    ),
    PageInfo(
        "pages/views/dataset.py",
        "Dataset",
        ":material/dataset:",
        "Class balance, metadata, image gallery, validation report and the lesion-grouped split.",
    ),
    PageInfo(
        "pages/views/train.py",
        "Train",
        ":material/model_training:",
        "Train a model in the background with live loss and accuracy curves.",
    ),
    PageInfo(
        "pages/views/evaluate.py",
        "Evaluate",
        ":material/analytics:",
        "Confusion matrix, ROC, calibration, melanoma threshold and the misclassified images with Grad-CAM.",
    ),
    PageInfo(
        "pages/views/diagnose.py",
        "Diagnose",
        ":material/stethoscope:",
        "Upload a dermoscopy image: calibrated probabilities, Grad-CAM and feature maps. Works without a dataset.",
    ),
    PageInfo(
        "pages/views/batch.py",
        "Batch",
        ":material/photo_library:",
        "Many images or a .zip at once: a sortable table of predictions and warnings, downloadable as CSV.",
    ),
    PageInfo(
        "pages/views/compare.py",
        "Compare",
        ":material/compare:",
        "Runs side by side, and a one-click experiment over the class-imbalance strategies.",
    ),
    PageInfo(
        "pages/views/quiz.py",
        "Quiz",
        ":material/quiz:",
        "Students diagnose held-out images, then see the truth, the model's answer and its heatmap, and "
        "their per-class results beside the model's.",
    ),
)
