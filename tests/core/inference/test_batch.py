"""Batch prediction (core.inference.batch and ``lesionlab predict … --csv``) with the bundled reference model on the
bundled sample's real images: one row per file, the same answers as one image at a time, bad files as rows with
their error, and archives that cannot hurt the computer they are opened on."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import predict as predict_cli
from core.common.labels import CLASSES, DISPLAY_NAMES
from core.inference import batch
from core.inference.batch import BatchError, archive_files, folder_files, gather, image_bytes, predict_files
from core.inference.opening import open_predictor
from core.inference.prediction import LOW_CONFIDENCE
from core.inference.predictor import USE_TTA_BY_DEFAULT, Predictor
from core.models.checkpoints import atomic_save, read_checkpoint
from core.models.ensemble_file import ensemble_dict
from tests.conftest import ROOT, patched, write_truncated_jpeg, zip_bytes

REFERENCE = ROOT / "checkpoints" / "reference.pt"
SAMPLE = sorted((ROOT / "sample_data" / "ham10000-sample" / "images").glob("*.jpg"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return open_predictor(REFERENCE)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six sample images (two in a subfolder), a JPEG cut short and a text file."""
    root = tmp_path / "batch"
    (root / "more").mkdir(parents=True)
    for i, src in enumerate(SAMPLE[::24][:6]):
        shutil.copy(src, root / ("more" if i >= 4 else "") / src.name)
    write_truncated_jpeg(root / "cut.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_gives_one_row_per_file_with_single_image_answers(predictor, folder):
    files = folder_files(folder)
    seen = []
    rows = list(predict_files(predictor, files, batch_size=4, progress=lambda done, total: seen.append((done, total))))
    by_name = {row.file: row for row in rows}
    assert [row.file for row in rows] == [f.name for f in files]
    assert set(by_name) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert seen == [(4, 8), (8, 8)]
    good = [row for row in rows if row.error is None]
    assert len(good) == 6
    for row in good:
        single = predictor.predict(folder / row.file)
        assert row.top_class == single.top_class
        assert row.p_melanoma == pytest.approx(single.probabilities["mel"], abs=1e-4)
        assert row.confidence == pytest.approx(single.confidence, abs=1e-4)
        assert row.p_malignant == pytest.approx(single.malignant_probability, abs=1e-4)
        # The referral rules met, as Diagnose shows them for this answer.
        assert row.refer == tuple(r.rule.key for r in predictor.referrals if r.refers(single))
        assert sum(row.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert row.thumbnail.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(row.thumbnail.split(",", 1)[1])))
        assert thumb.width <= batch.THUMBNAIL_SIZE[0] and thumb.height <= batch.THUMBNAIL_SIZE[1]
    assert "damaged or truncated" in by_name["cut.jpg"].error and by_name["cut.jpg"].top_class is None
    assert "not a JPEG or PNG" in by_name["notes.txt"].error


def test_what_is_being_done_is_said_before_each_step(predictor, folder):
    """A page's bar says what is being done from the first second: each file as it is read, each model pass as it
    starts, with counts, before the batch that holds them is done (the Batch page showed an empty bar for 47 s)."""
    files = folder_files(folder)
    heard: list[tuple[str, object]] = []
    rows = predict_files(
        predictor,
        files,
        tta=True,
        batch_size=4,
        progress=lambda done, total: heard.append(("progress", done)),
        stage=lambda text: heard.append(("stage", text)),
    )
    first = next(rows)
    size = batch.bounded_batch_size(4, predictor.largest_input_size, True)
    said = [text for kind, text in heard if kind == "stage"]
    n = len(files)
    assert said[:size] == [f"reading and decoding {f.name} ({i + 1} of {n})" for i, f in enumerate(files[:size])]
    assert said[size] == f"running the model on files 1–{size} of {len(files)} ({batch.view_count(True)} views each)"
    assert first.file == files[0].name and ("progress", size) not in heard  # all said before the batch was done
    list(rows)
    assert heard[-1] == ("progress", len(files))


def test_warnings_are_the_diagnose_pages(predictor, monkeypatch):
    # Every rule at 0: any image it assesses is referred, so a row without a referral is one it did not assess.
    monkeypatch.setattr(
        predictor, "referrals", tuple(dataclasses.replace(r, threshold=0.0) for r in predictor.referrals)
    )
    document = Image.new("RGB", (200, 150), "white")
    document.paste((30, 30, 30), (20, 60, 180, 70))  # a line of "text"
    buffer = io.BytesIO()
    document.save(buffer, "PNG")
    real = SAMPLE[0].read_bytes()
    rows = list(predict_files(predictor, [image_bytes("doc.png", buffer.getvalue()), image_bytes("a.jpg", real)]))
    assert any(w.startswith("unlike the dermoscopy the model learnt from") for w in rows[0].warnings)
    # the measured reason and the colour findings, as Diagnose words them
    assert "farther from the model's training images" in " ".join(rows[0].warnings)
    assert "plain white" in " ".join(rows[0].warnings)
    assert not any("unlike the dermoscopy" in w for w in rows[1].warnings)
    low = [w for w in rows[1].warnings if w.startswith("low confidence")]
    assert bool(low) == (rows[1].confidence < 0.5)
    # As on Diagnose, an image that is not assessed refers nothing; a lesion is referred by every rule at 0.
    assert rows[0].refer == () and rows[1].refer == ("malignant", "melanoma")


# A greyscale photograph the reference model is unsure of (under 50 %) and that the unfamiliar check flags.
CAMERAMAN = ROOT / "tests" / "data" / "unfamiliar" / "held-out" / "grey-camera-0.jpg"


def test_a_picture_not_assessed_is_not_called_undecided(predictor):
    """Its row is marked not assessed and carries the unfamiliar warning alone: "low confidence … the most likely
    class" would speak of a result that Diagnose does not give for it."""
    assert predictor.predict(CAMERAMAN).confidence < LOW_CONFIDENCE  # else this test would test nothing
    [row] = predict_files(predictor, [image_bytes(CAMERAMAN.name, CAMERAMAN.read_bytes())])
    assert not row.assessed and row.refer == ()
    assert len(row.warnings) == 1 and row.warnings[0].startswith("unlike the dermoscopy the model learnt from")
    [lesion] = predict_files(predictor, [image_bytes("a.jpg", SAMPLE[0].read_bytes())])
    assert lesion.assessed


def test_a_picture_not_assessed_has_no_class_and_its_csv_row_says_why(predictor):
    """As on Diagnose, a flagged image's class and probabilities are no finding: its row and CSV row hold none (they
    named a class and P(melanoma) like any lesion's) and say why, in the check's own words; the counts keep it apart
    from the images assessed and from the files that could not be used."""
    files = [image_bytes(CAMERAMAN.name, CAMERAMAN.read_bytes()), image_bytes("a.jpg", SAMPLE[0].read_bytes())]
    photo, lesion = predict_files(predictor, files)
    check = predictor.unfamiliar(predictor.predict(CAMERAMAN))
    assert check.unfamiliar  # the shipped model's check flags it, else this test would test nothing
    assert photo.not_assessed == check.reasons and photo.outcome == batch.NOT_ASSESSED
    assert (photo.top_class, photo.diagnosis, photo.p_melanoma, photo.p_malignant, photo.confidence) == (None,) * 5
    assert photo.probabilities == {} and photo.thumbnail.startswith("data:image/jpeg;base64,")
    assert lesion.outcome == batch.ASSESSED and lesion.top_class in CLASSES and lesion.not_assessed == ()

    out = io.StringIO()
    outcomes = batch.write_csv(predict_files(predictor, [*files, image_bytes("x.jpg", b"not a jpeg")]), out)
    assert outcomes == {batch.ASSESSED: 1, batch.NOT_ASSESSED: 1, batch.FAILED: 1}
    rows = {row["file"]: row for row in csv.DictReader(io.StringIO(out.getvalue()))}
    flagged = rows[CAMERAMAN.name]
    assert flagged["diagnosis"] == "not assessed" and flagged["not_assessed"] == " | ".join(check.reasons)
    assert flagged["warnings"].startswith("unlike the dermoscopy the model learnt from")
    assert [flagged[c] for c in ("top_class", "p_melanoma", "confidence", "p_malignant", "refer", "error")] == [""] * 6
    assert all(flagged[f"p_{code}"] == "" for code in CLASSES)
    assert rows["a.jpg"]["top_class"] == lesion.top_class and rows["a.jpg"]["not_assessed"] == ""


def test_an_archive_with_bad_members_predicts_the_rest(predictor):
    good = {f"lesions/{p.name}": p.read_bytes() for p in SAMPLE[:3]}
    data = zip_bytes(
        {
            **good,
            "lesions/fake.jpg": b"this is text, not a JPEG",
            "readme.txt": b"hello",
            "../escape.jpg": SAMPLE[3].read_bytes(),
            "/etc/absolute.jpg": SAMPLE[3].read_bytes(),
            "__MACOSX/lesions/._x.jpg": b"resource fork",
            "lesions/.hidden.jpg": SAMPLE[4].read_bytes(),
        }
    )
    rows = {row.file: row for row in predict_files(predictor, archive_files(data, "upload.zip"))}
    assert set(rows) == {
        *(f"upload.zip/{name}" for name in good),
        "upload.zip/lesions/fake.jpg",
        "upload.zip/readme.txt",
        "upload.zip/../escape.jpg",
        "upload.zip//etc/absolute.jpg",
    }
    for name in good:
        single = predictor.predict(good[name])
        assert rows[f"upload.zip/{name}"].top_class == single.top_class
        assert rows[f"upload.zip/{name}"].error is None
    assert "not an image PIL can read" in rows["upload.zip/lesions/fake.jpg"].error
    assert "not a JPEG or PNG" in rows["upload.zip/readme.txt"].error
    for unsafe in ("upload.zip/../escape.jpg", "upload.zip//etc/absolute.jpg"):
        assert "unsafe path" in rows[unsafe].error and rows[unsafe].top_class is None


def test_archive_bombs_and_junk_are_refused_before_inflating(predictor, monkeypatch):
    # 11 MiB of zeros deflate to about 11 KB: refused from the declared size, never inflated.
    bomb = zip_bytes({"bomb.png": bytes(11 * 2**20), "ok.jpg": SAMPLE[0].read_bytes()})
    assert len(bomb) < 100_000
    rows = list(predict_files(predictor, archive_files(bomb, "bomb.zip")))
    assert "at most 10.0 MiB" in rows[0].error and "11.0 MiB" in rows[0].error
    assert rows[1].error is None
    with pytest.raises(BatchError, match="unpacks to .*at most"):
        monkeypatch.setattr(batch, "MAX_ARCHIVE_BYTES", 10 * 2**20)
        archive_files(bomb, "bomb.zip")
    monkeypatch.setattr(batch, "MAX_FILES", 2)
    with pytest.raises(BatchError, match="holds 3 files; a batch takes at most 2"):
        archive_files(zip_bytes({f"{i}.jpg": b"x" for i in range(3)}), "many.zip")
    with pytest.raises(BatchError, match="junk.zip is not a readable zip archive"):
        archive_files(b"PK not really a zip", "junk.zip")


def test_members_that_cannot_be_unpacked_get_the_unpackers_error_and_the_rest_go_on(predictor):
    good = {p.name: p.read_bytes() for p in SAMPLE[:3]}
    names = list(good)
    data = patched(patched(zip_bytes(good), names[1], flags=0x1), names[2], method=9)  # encrypted, deflate64
    rows = list(predict_files(predictor, archive_files(data, "upload.zip")))
    assert rows[0].error is None and rows[0].top_class in CLASSES
    assert (
        rows[1].error
        == f"upload.zip/{names[1]} is encrypted; unpack it with its password and archive it again without one."
    )
    assert rows[2].error.startswith(
        f"upload.zip/{names[2]} is compressed with deflate64, which cannot be unpacked here"
    )


def test_gather_names_what_it_cannot_open(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        gather([tmp_path / "missing.zip"])
    (tmp_path / "x.jpg").write_bytes(SAMPLE[0].read_bytes())
    assert [f.name for f in gather([tmp_path / "x.jpg", tmp_path / "gone.jpg"])] == [
        str(tmp_path / "x.jpg"),
        str(tmp_path / "gone.jpg"),
    ]


# ---------------------------------------------------------------------------
# The command line


def run_predict(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core.cli.predict", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
def test_cli_writes_a_row_per_file_as_the_predictor_answers(predictor, folder, tmp_path):
    out = tmp_path / "out.csv"
    result = run_predict(REFERENCE, folder, "--csv", out, "--batch-size", "3")
    assert result.returncode == 1, result.stderr  # two files could not be predicted
    rows = read_csv(out)
    assert list(rows[0]) == list(batch.CSV_COLUMNS)
    assert len(rows) == 8
    assert "8/8 files" in result.stderr and "6 assessed, 0 not assessed" in result.stderr
    assert "2 could not be used" in result.stderr
    for row in rows:
        if row["file"] in ("cut.jpg", "notes.txt"):
            assert row["error"] and not row["top_class"]
            continue
        single = predictor.predict(folder / row["file"], tta=USE_TTA_BY_DEFAULT)  # the command line's default
        assert row["top_class"] == single.top_class and not row["error"]
        probs = np.array([float(row[f"p_{code}"]) for code in CLASSES])
        np.testing.assert_allclose(probs, single.probs, atol=1e-4)
        assert float(row["p_melanoma"]) == pytest.approx(single.probabilities["mel"], abs=1e-4)


@pytest.mark.integration
def test_cli_reads_a_zip_and_says_what_it_cannot_use(tmp_path, capsys):
    archive = tmp_path / "lesions.zip"
    archive.write_bytes(zip_bytes({p.name: p.read_bytes() for p in SAMPLE[:2]}))
    out = tmp_path / "out.csv"
    ok = run_predict(REFERENCE, archive, "--csv", out)  # a real process, end to end
    assert ok.returncode == 0, ok.stderr
    assert [r["file"] for r in read_csv(out)] == [f"lesions.zip/{p.name}" for p in SAMPLE[:2]]

    # What it cannot use, through the same main in this process: one line each, exit status 2.
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    capsys.readouterr()
    assert predict_cli.main([str(REFERENCE), str(tmp_path / "junk.zip"), "--csv", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: junk.zip is not a readable zip archive (no end-of-central-directory record)."
    ]
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal, as for any wrong use of the flags
        predict_cli.main([str(REFERENCE), str(archive)])
    assert refused.value.code == 2 and "add --csv OUT.csv" in capsys.readouterr().err
    broken_ckpt = tmp_path / "broken.pt"
    broken_ckpt.write_bytes(b"nope")
    assert predict_cli.main([str(broken_ckpt), str(archive), "--csv", str(out)]) == 2


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> Path:
    """An ensemble file of two copies of the reference model (no detector fitted beside it: its colour check decides
    whether a picture is dermoscopy)."""
    ref = read_checkpoint(REFERENCE)
    path = tmp_path_factory.mktemp("twins") / "twins.pt"
    atomic_save(ensemble_dict([ref, ref], ["a", "b"], temperature=1.0, config={**ref["config"]}), path)
    return path


@pytest.mark.integration
@pytest.mark.parametrize("model", ["checkpoint", "ensemble"])
def test_cli_says_a_picture_unlike_dermoscopy_was_not_assessed(model, twins, tmp_path):
    """One image and --csv, a single checkpoint and an ensemble file: the photograph gets "not assessed" and the
    check's reasons where a lesion gets its class (it got a class and seven probabilities like a lesion), and the
    command still succeeds."""
    path = REFERENCE if model == "checkpoint" else twins
    predictor = open_predictor(path)
    check = predictor.unfamiliar(predictor.predict(CAMERAMAN, tta=USE_TTA_BY_DEFAULT))
    lesion = predictor.predict(SAMPLE[0], tta=USE_TTA_BY_DEFAULT)
    assert check.unfamiliar and not predictor.unfamiliar(lesion).unfamiliar  # else this test would test nothing

    one = run_predict(path, CAMERAMAN, SAMPLE[0])
    assert one.returncode == 0, one.stderr
    photo_lines, lesion_text = one.stdout.split(f"\n{SAMPLE[0]}: ")
    assert photo_lines.splitlines() == [
        f"{CAMERAMAN}: not assessed: unlike the dermoscopy the model learnt from",
        *(f"  {reason}" for reason in check.reasons),
    ]
    assert not [name for name in DISPLAY_NAMES.values() if name in photo_lines]
    assert lesion_text.startswith(f"{lesion.top_name} ({lesion.top_class})")

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(CAMERAMAN, folder)
    shutil.copy(SAMPLE[0], folder)
    out = tmp_path / "out.csv"
    table = run_predict(path, folder, "--csv", out)
    assert table.returncode == 0, table.stderr
    assert "1 assessed, 1 not assessed" in table.stderr and "0 could not be used" in table.stderr
    rows = {row["file"]: row for row in read_csv(out)}
    flagged = rows[CAMERAMAN.name]
    assert flagged["diagnosis"] == "not assessed" and flagged["not_assessed"] == " | ".join(check.reasons)
    assert flagged["top_class"] == flagged["p_melanoma"] == flagged["confidence"] == flagged["refer"] == ""
    assert all(flagged[f"p_{code}"] == "" for code in CLASSES)
    assert rows[SAMPLE[0].name]["top_class"] == lesion.top_class and rows[SAMPLE[0].name]["not_assessed"] == ""


def test_cli_json_marks_a_picture_not_assessed_and_draws_it_no_heatmap(tmp_path, capsys):
    """--json: no class or probabilities for the photograph, only why; --gradcam writes no map for it (Diagnose
    shows none), and the lesion beside it keeps both."""
    cam = tmp_path / "cam.png"
    assert predict_cli.main([str(REFERENCE), str(CAMERAMAN), str(SAMPLE[0]), "--json", "--gradcam", str(cam)]) == 0
    photo, lesion = json.loads(capsys.readouterr().out)
    assert set(photo) == {"image", "assessed", "not_assessed"} and photo["assessed"] is False
    assert photo["not_assessed"][0].startswith("its unfamiliar-image score is")
    assert lesion["assessed"] is True and lesion["top_class"] in CLASSES and Path(lesion["gradcam"]).is_file()
    assert [p.name for p in tmp_path.glob("cam*.png")] == [Path(lesion["gradcam"]).name]
