"""The Diagnose page's report to keep: one self-contained HTML page, images inlined, nothing written to disk.

It holds what the page showed for one upload: the image and its heatmap, all seven calibrated probabilities in
``CLASSES`` order (for an ensemble, how many of its models agree and each one's answer), the similar confirmed
cases, the warnings, the model (name, version, measured test performance), the date and the disclaimer. It is
built in memory and handed to the browser as a download.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path

from PIL import Image

from core.common.formatting import percents_against
from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT
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


def model_info(path: str | Path, checkpoint: dict, arch: str) -> ModelInfo:
    path = Path(path)
    tests = recorded_test_results(path, checkpoint)
    name = (checkpoint.get("config") or {}).get("name") or path.stem
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    return ModelInfo(f"{name} ({path.name})", arch, digest, checkpoint.get("epoch"), tests[0] if tests else None)


def inline_image(image: Image.Image, size: tuple[int, int] | None = None) -> str:
    """An ``<img>`` source holding ``image`` as base64 JPEG, shrunk to fit ``size`` when given."""
    image = image.convert("RGB")
    if size:
        image = image.copy()
        image.thumbnail(size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _performance(test: dict | None) -> str:
    if not test:
        return "<p>No test-split evaluation of this model was found in its run records.</p>"
    mel = test.get("melanoma") or {}
    auc = (test.get("roc_auc") or {}).get("per_class", {}).get("mel")
    items = [
        f"accuracy {test['accuracy']:.1%}",
        f"balanced accuracy {test['balanced_accuracy']:.1%}",
    ]
    if auc is not None:
        items.append(f"melanoma ROC AUC {auc:.3f}")
    if "sensitivity" in mel:
        items.append(
            f"melanoma sensitivity {mel['sensitivity']:.1%} and specificity {mel['specificity']:.1%} at "
            f"P(mel) ≥ {mel['threshold']:.1%}"
        )
    n = test.get("n")
    return f"<p>Measured on its test split{f' ({n} images)' if n else ''}: {escape('; '.join(items))}.</p>"


def _case_cell(case: Case, title: str = "") -> str:
    try:
        src = inline_image(open_image(case.path), THUMB)
        img = f'<img src="{src}" alt="{escape(case.image_id)}">'
    except (OSError, ValueError):
        img = "<p>(image not readable)</p>"
    return (
        f"<figure>{img}<figcaption>{f'<b>{escape(title)}</b><br>' if title else ''}"
        f"{escape(case.diagnosis)} ({escape(case.dx)}), confirmed by {escape(case.confirmed_by)}<br>"
        f"{escape(case.patient())}<br>similarity {case.similarity:.2f} · {escape(case.image_id)}</figcaption></figure>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }
.notice { background: #fff4e5; border: 1px solid #f0a020; padding: .6rem 1rem; }
.warning { background: #fdecea; border: 1px solid #d33; padding: .6rem 1rem; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
td.p { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: .8rem; } figure { margin: 0; width: 200px; font-size: .8rem; }
figure img { width: 200px; } .pair img { max-width: 28rem; }
"""


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
    mel_threshold: float | None = None,
    source_name: str = "the uploaded image",
) -> str:
    """The whole report as one HTML document (UTF-8, no external resources)."""
    rows = "".join(
        f"<tr><td>{code}</td><td>{escape(DISPLAY_NAMES[code])}</td>"
        f"<td>{'malignant' if code in MALIGNANT else 'benign'}</td>"
        f'<td class="p">{prediction.probabilities[code]:.1%}</td></tr>'
        for code in CLASSES
    )
    images = f'<figure class="pair"><img src="{inline_image(prediction.image)}" alt="upload"><figcaption>'
    images += f"{escape(source_name)}</figcaption></figure>"
    if heatmap is not None:
        images += f'<figure class="pair"><img src="{inline_image(heatmap)}" alt="heatmap"><figcaption>'
        images += f"{escape(heatmap_label)}</figcaption></figure>"
    warning_html = "".join(f'<p class="warning">{escape(w)}</p>' for w in warnings)
    mel = prediction.probabilities["mel"]
    averaged = f" (averaged over {tta_description(True)})" if prediction.tta else ""
    mel_line = ""
    if mel_threshold is not None:
        side = "at or above" if mel >= mel_threshold else "below"
        shown_p, shown_t = percents_against(mel, mel_threshold)
        mel_line = f"<p>P(melanoma) {shown_p}: {side} the model's operating threshold of {shown_t}.</p>"
    agreement = ""
    if prediction.members is not None:  # an ensemble: how much its models agree, as Diagnose shows beside the result
        votes = prediction.members
        agreement = (
            f"<p><b>{escape(votes.agreement_text())}</b>. {escape(votes.spread_text())}. Each model's own calibrated "
            "answer: where they disagree or their P(melanoma) spreads widely, the combined number is less certain "
            "than it looks.</p>"
        )
        rows_by_model = "".join(
            f"<tr><td>{escape(name)}</td><td>{escape(DISPLAY_NAMES[code])} ({code}), {row.max():.1%}</td>"
            f'<td class="p">{p_mel:.1%}</td></tr>'
            for name, code, row, p_mel in zip(
                votes.names, votes.own_top_classes, votes.probs, votes.p_melanoma, strict=True
            )
        )
        agreement += (
            "<table><thead><tr><th>model</th><th>its most likely class</th><th>its P(melanoma)</th></tr></thead>"
            f"<tbody>{rows_by_model}</tbody></table>"
        )
    similar = ""
    if cases:
        similar += "<h2>Similar confirmed cases</h2><div class='grid'>"
        similar += "".join(_case_cell(c) for c in cases) + "</div>"
    if cases_by_class:
        similar += "<h3>The nearest case of each class</h3><div class='grid'>"
        similar += "".join(_case_cell(c, DISPLAY_NAMES[code]) for code, c in cases_by_class.items() if c)
        similar += "</div>"
    epochs = f", trained for {model.epochs} epochs" if model.epochs else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Lesion Lab report {created:%Y-%m-%d %H:%M}</title>
<style>{STYLE}</style></head><body>
<h1>Lesion Lab report</h1>
<p class="notice"><b>{escape(DISCLAIMER)}</b> Lesion Lab is not a medical device; see a dermatologist about any
skin lesion that worries you.</p>
<p>Created {created:%Y-%m-%d %H:%M %Z}. Model: {escape(model.name)}, {escape(model.arch)}, version
{model.version}{epochs}.</p>
{_performance(model.test)}
{warning_html}
<h2>Result</h2>
<p>Most likely: <b>{escape(prediction.top_name)} ({prediction.top_class})</b>, calibrated probability
{prediction.confidence:.1%}{averaged}. Malignant classes together: {prediction.malignant_probability:.1%}.</p>
{mel_line}
{agreement}
<table><thead><tr><th>class</th><th>diagnosis</th><th></th><th>probability</th></tr></thead>
<tbody>{rows}</tbody></table>
<div class="grid">{images}</div>
{similar}
<p><small>Probabilities are calibrated by temperature scaling on the validation split: an average over many
images, not a promise about this one.</small></p>
</body></html>
"""
