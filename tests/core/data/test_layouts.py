"""External dataset layouts: isic-cli exports, class folders, ISIC 2018 ground truth, and detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.common.labels import CLASSES
from core.data.dataset import DatasetError, index_dataset
from core.data.layouts import (
    CLASS_FOLDERS,
    HAM10000,
    ISIC2018,
    ISIC_CLI,
    detect_layout,
    diagnosis_code,
    import_class_folders,
    import_isic2018_ground_truth,
    import_isic_cli,
    index_any,
)
from tests.conftest import make_image


def put_image(path: Path, label: int = 0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(label, np.random.default_rng(seed)).save(path)
    return path


def dx_by_image(index) -> dict[str, str]:
    return dict(zip(index.frame["image_id"], index.frame["dx"], strict=True))


@pytest.fixture(scope="module")
def ham_columns(tiny_root) -> list[str]:
    return list(index_dataset(tiny_root).frame.columns)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("MEL", "mel"),
        ("akiec", "akiec"),
        ("Melanoma Invasive", "mel"),
        ("basal_cell_carcinoma", "bcc"),
        ("Melanocytic nevus", "nv"),
        ("Solar or actinic keratosis", "akiec"),
        ("Squamous cell carcinoma in situ, Bowens disease", "akiec"),
        ("lichen planus like keratosis", "bkl"),
        ("Benign soft tissue proliferations - Vascular", "vasc"),
        ("Squamous cell carcinoma, Invasive", None),
        ("Scar", None),
        ("Benign", None),
    ],
)
def test_diagnosis_names(name, code):
    assert diagnosis_code(name) == code


def test_class_folders(tmp_path, ham_columns):
    put_image(tmp_path / "MEL" / "a1.jpg", 4)
    put_image(tmp_path / "nv" / "2019" / "b1.png", 5)  # deeper inside a class folder still counts
    put_image(tmp_path / "Basal_Cell_Carcinoma" / "c1.jpg", 1)
    put_image(tmp_path / "scc" / "d1.jpg", 2)
    put_image(tmp_path / "loose.jpg")
    (tmp_path / "VASC").mkdir()
    (tmp_path / "VASC" / "e1.jpg").write_bytes(b"not an image at all")

    assert detect_layout(tmp_path).kind == CLASS_FOLDERS
    index = import_class_folders(tmp_path)

    assert dx_by_image(index) == {"a1": "mel", "b1": "nv", "c1": "bcc"}
    assert [CLASSES[i] for i in index.frame["label"]] == list(index.frame["dx"])
    assert list(index.frame.columns) == ham_columns
    assert set(index.frame["lesion_id"]) == {"image:a1", "image:b1", "image:c1"}  # each image its own lesion
    report = index.report
    assert len(report.unknown_diagnoses) == 1 and "'scc'" in report.unknown_diagnoses[0]
    assert "d1.jpg" in report.unknown_diagnoses[0]
    assert report.unreadable_files == [str(tmp_path / "VASC" / "e1.jpg")]
    assert any("loose.jpg" in item for item in report.images_without_metadata)
    assert report.images_found == 6
    assert dx_by_image(index_any(tmp_path)) == dx_by_image(index)


ISIC_CLI_CSV = """\
isic_id,attribution,copyright_license,age_approx,anatom_site_general,diagnosis_1,diagnosis_2,diagnosis_3,\
diagnosis_confirm_type,image_type,lesion_id,sex
ISIC_0000001,"Hospital Clínic de Barcelona, Spain",CC-BY,55,posterior torso,Malignant,\
Malignant melanocytic proliferations (Melanoma),Melanoma Invasive,histopathology,dermoscopic,IL_0000001,male
ISIC_0000002,ViDIR Group,CC-BY-NC,40,head/neck,Benign,Benign melanocytic proliferations,Nevus,\
serial imaging showing no change,dermoscopic,IL_0000001,female
ISIC_0000003,ViDIR Group,CC-BY-NC,,lower extremity,Benign,Benign soft tissue proliferations - Vascular,,\
single image expert consensus,dermoscopic,,
ISIC_0000004,ViDIR Group,CC-BY-NC,70,,Benign,Benign epidermal proliferations,Pigmented benign keratosis,\
histopathology,dermoscopic,IL_0000004,male
ISIC_0000005,MSKCC,CC-0,35,anterior torso,Benign,Benign epidermal proliferations,Scar,\
histopathology,dermoscopic,IL_0000005,female
ISIC_0000006,MSKCC,CC-0,80,head/neck,Malignant,Malignant epidermal proliferations,\
"Squamous cell carcinoma, Invasive",histopathology,dermoscopic,IL_0000006,male
ISIC_0000007,MSKCC,CC-0,60,palms/soles,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma in situ,\
histopathology,dermoscopic,IL_0000007,male
"""


def test_isic_cli_export(tmp_path, ham_columns):
    (tmp_path / "metadata.csv").write_text(ISIC_CLI_CSV, encoding="utf-8")
    (tmp_path / "attribution.txt").write_text("ViDIR Group\n")
    for n in range(1, 7):  # ISIC_0000007 has no image
        put_image(tmp_path / f"ISIC_{n:07d}.jpg", seed=n)
    put_image(tmp_path / "ISIC_0000099.jpg")  # an image without a metadata row

    assert detect_layout(tmp_path).kind == ISIC_CLI
    index = import_isic_cli(tmp_path)

    assert dx_by_image(index) == {
        "ISIC_0000001": "mel",
        "ISIC_0000002": "nv",
        "ISIC_0000003": "vasc",
        "ISIC_0000004": "bkl",
    }
    assert list(index.frame.columns) == ham_columns
    frame = index.frame.set_index("image_id")
    assert frame.loc["ISIC_0000001", "lesion_id"] == frame.loc["ISIC_0000002", "lesion_id"] == "IL_0000001"
    assert frame.loc["ISIC_0000003", "lesion_id"] == "image:ISIC_0000003"
    assert frame.loc["ISIC_0000001", "age"] == 55 and np.isnan(frame.loc["ISIC_0000003", "age"])
    assert frame.loc["ISIC_0000003", "sex"] == "unknown"
    assert frame.loc["ISIC_0000002", "localization"] == "head/neck"
    assert frame.loc["ISIC_0000004", "localization"] == "unknown"
    assert frame.loc["ISIC_0000001", "dx_type"] == "histopathology"
    report = index.report
    assert report.unknown_diagnoses == [
        "row 6: ISIC_0000005 has diagnosis 'Scar'",
        "row 7: ISIC_0000006 has diagnosis 'Squamous cell carcinoma, Invasive'",
    ]
    assert report.rows_without_images == ["row 8: ISIC_0000007"]
    assert report.images_without_metadata == [str(tmp_path / "ISIC_0000099.jpg")]
    assert dx_by_image(index_any(tmp_path)) == dx_by_image(index)


def test_isic_cli_legacy_diagnosis_column(tmp_path):
    rows = [
        ("ISIC_0010001", "melanoma"),
        ("ISIC_0010002", "seborrheic keratosis"),
        ("ISIC_0010003", "vascular lesion"),
        ("ISIC_0010004", "actinic keratosis"),
        ("ISIC_0010005", "lentigo simplex"),
        ("ISIC_0010006", ""),
    ]
    lines = ["isic_id,benign_malignant,diagnosis"] + [f"{i},benign,{dx}" for i, dx in rows]
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    for n, (image_id, _) in enumerate(rows):
        put_image(tmp_path / "images" / f"{image_id}.JPG", seed=n)

    index = index_any(tmp_path)

    assert dx_by_image(index) == {
        "ISIC_0010001": "mel",
        "ISIC_0010002": "bkl",
        "ISIC_0010003": "vasc",
        "ISIC_0010004": "akiec",
    }
    assert index.report.unknown_diagnoses == [
        "row 6: ISIC_0010005 has diagnosis 'lentigo simplex'",
        "row 7: ISIC_0010006 has diagnosis 'no diagnosis'",
    ]
    assert index.report.images_without_metadata == []  # set aside with their rows, not reported twice


def test_isic2018_ground_truth(tmp_path, ham_columns):
    gt = [
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC",
        "ISIC_0034524,0.0,1.0,0.0,0.0,0.0,0.0,0.0",
        "ISIC_0034525,1.0,0.0,0.0,0.0,0.0,0.0,0.0",
        "ISIC_0034526,0.0,0.0,0.0,1.0,0.0,0.0,0.0",
        "ISIC_0034527,1.0,1.0,0.0,0.0,0.0,0.0,0.0",  # two positives
        "ISIC_0034528,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
    ]  # no image
    (tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv").write_text("\r\n".join(gt) + "\r\n")
    images = tmp_path / "ISIC2018_Task3_Test_Input"
    for n, image_id in enumerate(["ISIC_0034524", "ISIC_0034525", "ISIC_0034526", "ISIC_0034527", "ISIC_0034599"]):
        put_image(images / f"{image_id}.jpg", seed=n)
    (images / "LICENSE.txt").write_text("CC-BY-NC")

    assert detect_layout(tmp_path).kind == ISIC2018
    index = import_isic2018_ground_truth(tmp_path)

    assert dx_by_image(index) == {"ISIC_0034524": "nv", "ISIC_0034525": "mel", "ISIC_0034526": "akiec"}
    assert list(index.frame["label"]) == [CLASSES.index(c) for c in ("nv", "mel", "akiec")]
    assert list(index.frame.columns) == ham_columns
    report = index.report
    assert len(report.unknown_diagnoses) == 1 and report.unknown_diagnoses[0].startswith("row 5: ISIC_0034527")
    assert report.rows_without_images == ["row 6: ISIC_0034528"]
    assert report.images_without_metadata == [str(images / "ISIC_0034599.jpg")]
    assert dx_by_image(index_any(tmp_path)) == dx_by_image(index)


def test_ham10000_layouts_go_to_index_dataset(tiny_root, tmp_path):
    assert detect_layout(tiny_root).kind == HAM10000
    assert index_any(tiny_root).frame.equals(index_dataset(tiny_root).frame)

    # Dataverse's ISIC 2018 test ground truth uses the HAM10000 metadata columns, quoted and tab-separated.
    tab = [
        '"lesion_id"\t"image_id"\t"dx"\t"dx_type"\t"age"\t"sex"\t"localization"\t"dataset"',
        '"HAMTEST_0000001"\t"ISIC_0034524"\t"nv"\t"follow_up"\t40\t"female"\t"back"\t"vidir_molemax"',
        '"HAMTEST_0000002"\t"ISIC_0034525"\t"bcc"\t"histo"\t70\t"male"\t"face"\t"rosendahl"',
    ]
    (tmp_path / "ISIC2018_Task3_Test_GroundTruth.tab").write_text("\n".join(tab) + "\n")
    put_image(tmp_path / "ISIC2018_Task3_Test_Images" / "ISIC_0034524.jpg")
    put_image(tmp_path / "ISIC2018_Task3_Test_Images" / "ISIC_0034525.jpg", seed=1)
    assert detect_layout(tmp_path).kind == HAM10000
    assert dx_by_image(index_any(tmp_path)) == {"ISIC_0034524": "nv", "ISIC_0034525": "bcc"}


def test_unrecognised_folder_says_what_is_expected(tmp_path):
    (tmp_path / "misc").mkdir()
    put_image(tmp_path / "misc" / "x.jpg")
    (tmp_path / "labels.csv").write_text("file,label\nx.jpg,1\n")
    with pytest.raises(DatasetError) as info:
        index_any(tmp_path)
    message = str(info.value)
    assert "labels.csv" in message and "misc" in message
    assert "isic-cli" in message and "one folder per class" in message
    with pytest.raises(DatasetError, match="does not exist"):
        index_any(tmp_path / "nowhere")


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("isic_id,diagnosis\nISIC_1,scar\n")
    put_image(tmp_path / "ISIC_1.jpg")
    with pytest.raises(DatasetError, match="No usable images") as info:
        index_any(tmp_path)
    assert "'scar'" in str(info.value)
