"""The Diagnose page's report to keep: one self-contained HTML page, images inlined, nothing written to disk.

It holds what the page showed for one upload: the image and its heatmap, all seven calibrated probabilities in
``CLASSES`` order, each referral rule's verdict in the page's words with its measured sensitivity and specificity
(for an ensemble, how many of its models agree and each one's answer), the similar confirmed cases, the warnings, the
model (name, version, measured test performance), the date and the disclaimer. An image the unfamiliar-image check
flagged was not assessed: the report says so and why, and shows nothing about any class. It is built in memory and
handed to the browser as a download. Its HTML is ``templates/report.html.j2``.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined
from PIL import Image

from core.app.referral import ReferralView
from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT
from core.common.schema import is_finite_number
from core.data.images import open_image
from core.evaluation.records import recorded_test_results
from core.inference.forward import tta_description
from core.inference.prediction import Prediction
from core.inference.predictor import DISCLAIMER
from core.inference.similar import Case

THUMB = (200, 150)


@dataclass(frozen=True)
class ModelInfo:
    """What the report says about the model: ``version`` is the checkpoint file's SHA-1 (12 digits)."""

    name: str
    arch: str
    version: str
    epochs: int | None
    test: dict | None  # the recorded test-split evaluation (core.metrics.classification.compute_metrics), if any
    test_tta: bool = False  # whether ``test`` averaged the flips


def model_info(path: str | Path, checkpoint: dict, arch: str, *, tta: bool = False) -> ModelInfo:
    """The model as the report names it, with its recorded test results for the ``tta`` setting (else the other's)."""
    path = Path(path)
    name = (checkpoint.get("config") or {}).get("name") or path.stem
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    for views in (tta, not tta):
        if tests := recorded_test_results(path, checkpoint, tta=views):
            return ModelInfo(f"{name} ({path.name})", arch, digest, checkpoint.get("epoch"), tests[0], views)
    return ModelInfo(f"{name} ({path.name})", arch, digest, checkpoint.get("epoch"), None)


def inline_image(image: Image.Image, size: tuple[int, int] | None = None) -> str:
    """An ``<img>`` source holding ``image`` as base64 JPEG, shrunk to fit ``size`` when given."""
    image = image.convert("RGB")
    if size:
        image = image.copy()
        image.thumbnail(size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# The report's HTML lives in templates/report.html.j2, autoescaped: every value handed to it is plain text (numbers
# formatted here) and is escaped there. The images are data: URIs of base64 JPEGs built by inline_image, which
# escaping leaves as they are, so nothing is marked safe.
TEMPLATES = Environment(
    loader=PackageLoader("core.app", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _share(value: object) -> float | None:
    """A recorded rate (accuracy, AUC, sensitivity…) when it is one: a finite number from 0 to 1."""
    return float(value) if is_finite_number(value) and 0 <= value <= 1 else None


def _performance(model: ModelInfo) -> dict | None:
    """The measured test performance to quote: the split's size (None if unknown), its views and each figure in
    words. A run record is a file anyone can edit: a size that is not a whole number, or a figure that is not a rate
    from 0 to 1, is left out rather than quoted. The referral rules' sensitivity and specificity are beside their
    verdicts (core.app.referral)."""
    test = model.test
    if not isinstance(test, dict):
        return None
    roc = test.get("roc_auc") if isinstance(test.get("roc_auc"), dict) else {}
    per_class = roc.get("per_class") if isinstance(roc.get("per_class"), dict) else {}
    accuracy, balanced, auc = (
        _share(v) for v in (test.get("accuracy"), test.get("balanced_accuracy"), per_class.get("mel"))
    )
    items = [f"accuracy {accuracy:.1%}"] if accuracy is not None else []
    if balanced is not None:
        items.append(f"balanced accuracy {balanced:.1%}")
    if auc is not None:
        items.append(f"melanoma ROC AUC {auc:.3f}")
    n = test.get("n")
    size = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    views = "averaging the flips" if model.test_tta else "from one view of each image"
    return {"n": size, "views": views, "figures": items} if items else None


def _case(case: Case, title: str = "") -> dict:
    """One similar case as the report shows it; ``src`` is None when its image cannot be read."""
    try:
        src = inline_image(open_image(case.path), THUMB)
    except (OSError, ValueError):
        src = None
    return {
        "src": src,
        "title": title,
        "diagnosis": case.diagnosis,
        "dx": case.dx,
        "confirmed_by": case.confirmed_by,
        "patient": case.patient(),
        "similarity": f"{case.similarity:.2f}",
        "image_id": case.image_id,
    }


def _agreement(prediction: Prediction) -> dict | None:
    """An ensemble's agreement, as Diagnose shows it beside the result, and each model's own answer."""
    votes = prediction.members
    if votes is None:
        return None
    members = [
        {
            "name": name,
            "class_name": DISPLAY_NAMES[code],
            "code": code,
            "p_top": f"{row.max():.1%}",
            "p_mel": f"{p:.1%}",
        }
        for name, code, row, p in zip(votes.names, votes.own_top_classes, votes.probs, votes.p_melanoma, strict=True)
    ]
    return {"agreement": votes.agreement_text(), "spread": votes.spread_text(), "members": members}


def report_html(
    prediction: Prediction,
    *,
    model: ModelInfo,
    created: datetime,
    heatmap: Image.Image | None = None,
    heatmap_label: str = "",
    warnings: Sequence[str] = (),
    cases: Sequence[Case] = (),
    cases_by_class: dict[str, Case | None] | None = None,
    referrals: Sequence[ReferralView] = (),
    not_assessed: str | None = None,
    source_name: str = "the uploaded image",
) -> str:
    """The whole report as one HTML document (UTF-8, no external resources). ``not_assessed``: why the image was
    not assessed (the unfamiliar-image check flagged it); the report then holds no class, verdict or case."""
    images = [{"src": inline_image(prediction.image), "alt": "upload", "caption": source_name}]
    if heatmap is not None and not not_assessed:
        images.append({"src": inline_image(heatmap), "alt": "heatmap", "caption": heatmap_label})
    context = {
        "created_minute": f"{created:%Y-%m-%d %H:%M}",
        "created": f"{created:%Y-%m-%d %H:%M %Z}",
        "disclaimer": DISCLAIMER,
        "model": {"name": model.name, "arch": model.arch, "version": model.version, "epochs": model.epochs},
        "performance": _performance(model),
        "warnings": list(warnings),
        "not_assessed": not_assessed,
        "result": {
            "top_name": prediction.top_name,
            "top_class": prediction.top_class,
            "confidence": f"{prediction.confidence:.1%}",
            "averaged_over": tta_description(True) if prediction.tta else None,
            "malignant": f"{prediction.malignant_probability:.1%}",
        },
        "referrals": [{"verdict": r.verdict, "refers": r.refers, "note": r.note} for r in referrals],
        "agreement": _agreement(prediction),
        "classes": [
            {
                "code": code,
                "name": DISPLAY_NAMES[code],
                "kind": "malignant" if code in MALIGNANT else "benign",
                "p": f"{prediction.probabilities[code]:.1%}",
            }
            for code in CLASSES
        ],
        "images": images,
        "cases": [_case(c) for c in cases],
        # None: no per-class search was made (no heading); a class with no case among the images searched is left out.
        "cases_by_class": None
        if not cases_by_class
        else [_case(c, DISPLAY_NAMES[code]) for code, c in cases_by_class.items() if c],
    }
    return TEMPLATES.get_template("report.html.j2").render(context)
