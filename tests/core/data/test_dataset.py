"""Labels, metadata parsing, discovery and validation, lesion-grouped splits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.common import labels
from core.data.dataset import (
    MAX_COLUMNS,
    MAX_HEADER_BYTES,
    MAX_WALK_DEPTH,
    SOURCES_NAME,
    UNKNOWN_SOURCE,
    DatasetError,
    LesionDataset,
    index_dataset,
    read_metadata,
    read_table,
    walk_files,
)
from core.data.images import ImageError
from core.data.preprocessing import Preprocessing, eval_transform, train_transform
from core.data.splits import SplitError, holdout_sources, split_by_lesion, split_counts
from tests.conftest import write_truncated_jpeg


def test_class_list_is_the_ham10000_codes_in_order():
    assert labels.CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert labels.MALIGNANT == {"akiec", "bcc", "mel"}
    assert labels.DISPLAY_NAMES["mel"] == "Melanoma"
    assert labels.class_index("MEL") == 4 and labels.class_index("vasc") == 6
    with pytest.raises(KeyError, match="unknown diagnosis code 'scc'"):
        labels.class_index("scc")


def test_isic2018_onehot_columns_map_to_codes():
    row = {
        "image": "ISIC_0034524",
        "MEL": "0.0",
        "NV": "1.0",
        "BCC": "0",
        "AKIEC": "0",
        "BKL": "0",
        "DF": "0",
        "VASC": "0",
    }
    assert labels.code_from_onehot(row) == "nv"
    with pytest.raises(ValueError):
        labels.code_from_onehot({**row, "MEL": "1.0"})
    with pytest.raises(ValueError, match="differs"):
        labels.check_class_order(["mel", *[c for c in labels.CLASSES if c != "mel"]])


def test_metadata_csv_crlf_and_dataverse_tab_read_the_same(tmp_path):
    rows = [
        ("HAM_1", "ISIC_1", "mel", "histo", "80", "male", "back"),
        ("HAM_1", "ISIC_2", "mel", "histo", "80.0", "unknown", "back"),
        ("HAM_2", "ISIC_3", "NV", "follow_up", "", "", "face"),
    ]
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization"
    csv = tmp_path / "m.csv"
    csv.write_bytes(("\r\n".join([header, *[",".join(r) for r in rows]]) + "\r\n").encode())
    tab = tmp_path / "m.tab"
    quoted = ["\t".join(f'"{c}"' if not c.replace(".", "").isdigit() else c for c in r) for r in rows]
    tab.write_text("\n".join([header.replace(",", "\t"), *quoted]) + "\n")
    a, b = read_metadata(csv), read_metadata(tab)
    pd.testing.assert_frame_equal(a, b)
    assert a["age"].tolist()[:2] == [80.0, 80.0] and np.isnan(a["age"].iloc[2])
    assert a["sex"].tolist() == ["male", "unknown", "unknown"]
    assert a["dx"].tolist() == ["mel", "mel", "nv"]
    assert a["row"].tolist() == [2, 3, 4]


def test_index_finds_nested_images_and_reports_every_mismatch(tiny_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    meta = (root / "HAM10000_metadata.csv").read_text()
    first = sorted((root / "HAM10000_images_part_1").iterdir())[0]
    # A file with an upper-case suffix deep in a new folder, one without metadata, a duplicate id,
    # a row with an unknown dx, a row without an image and a file that is not an image.
    deep = root / "extra" / "nested"
    deep.mkdir(parents=True)
    shutil.move(first, deep / (first.stem + ".JPG"))
    shutil.copy(deep / (first.stem + ".JPG"), deep / "ISIC_7777777.jpeg")
    shutil.copy(deep / (first.stem + ".JPG"), root / "HAM10000_images_part_2" / (first.stem + ".png"))
    (root / "HAM10000_images_part_2" / "ISIC_8888888.jpg").write_text("not an image")
    meta += "HAM_X,ISIC_6666666,bcc,histo,50,male,back\r\nHAM_Y,ISIC_5555555,scc,histo,50,male,back\r\n"
    meta += "HAM_Z,ISIC_8888888,nv,histo,50,male,back\r\n"
    (root / "HAM10000_metadata.csv").write_text(meta)

    index = index_dataset(root)
    report = index.report
    assert first.stem in set(index.frame["image_id"])
    assert any("ISIC_7777777" in p for p in report.images_without_metadata)
    assert any(first.stem in d for d in report.duplicate_image_ids)
    assert any("ISIC_6666666" in r for r in report.rows_without_images)
    assert any("ISIC_5555555" in r and "'scc'" in r for r in report.unknown_diagnoses)
    assert any("ISIC_8888888" in r for r in report.unreadable_files)
    assert not report.ok
    assert len(report.problems()) == 5
    assert set(index.frame["image_id"]).isdisjoint({"ISIC_8888888", "ISIC_6666666", "ISIC_5555555"})
    # Every usable image's label is its dx's index in the one class list.
    assert (index.frame["label"] == index.frame["dx"].map(labels.CLASSES.index)).all()


def test_index_errors_tell_the_user_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        index_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="lesionlab download"):
        index_dataset(tmp_path)
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\n")
    with pytest.raises(DatasetError, match="No usable images"):
        index_dataset(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("folder", ["/proc", "/"])
def test_system_folders_give_a_dataset_error(folder):
    # "/" ends at a bound of the walk; /proc, whose folders come and go while it is read, may also end
    # without any metadata found. Either way a message, never an OSError or minutes of walking.
    with pytest.raises(
        DatasetError,
        match=f"^(No HAM10000 metadata found below {folder}|{folder} has folders "
        f"more than {MAX_WALK_DEPTH} levels deep|{folder} holds more than)",
    ):
        index_dataset(folder)


def test_a_folder_too_deep_is_refused_with_its_path(tiny_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    deep = root.joinpath(*[f"level{i}" for i in range(1, MAX_WALK_DEPTH + 2)])
    deep.mkdir(parents=True)
    shutil.copy(next((root / "HAM10000_images_part_1").iterdir()), deep / "ISIC_7777777.jpg")
    with pytest.raises(DatasetError, match=f"more than {MAX_WALK_DEPTH} levels deep \\({deep}\\)"):
        index_dataset(root)
    # One level up is still walked.
    shutil.move(deep / "ISIC_7777777.jpg", deep.parent / "ISIC_7777777.jpg")
    deep.rmdir()
    assert index_dataset(root).report.images_without_metadata == [str(deep.parent / "ISIC_7777777.jpg")]


def test_the_walk_stops_at_its_entry_and_time_bounds(tmp_path):
    for i in range(30):
        (tmp_path / f"ISIC_{i}.jpg").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "ISIC_99.jpg").write_bytes(b"")
    os.mkfifo(tmp_path / "ISIC_fifo.jpg")  # opening it would block for ever
    found = sorted(p.name for p in walk_files(tmp_path, lambda name: name.endswith(".jpg"), max_entries=40))
    assert found == sorted(f"ISIC_{i}.jpg" for i in range(30))
    with pytest.raises(DatasetError, match=f"{tmp_path} holds more than 20 files and folders"):
        list(walk_files(tmp_path, lambda name: True, max_entries=20))
    with pytest.raises(DatasetError, match=f"Looking through {tmp_path} took more than 0 s"):
        list(walk_files(tmp_path, lambda name: True, max_seconds=0))


@pytest.mark.timeout(60)
def test_a_special_file_named_like_an_image_is_not_opened(tiny_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    image = sorted((root / "HAM10000_images_part_1").iterdir())[0]
    image.unlink()
    os.mkfifo(image)  # listed in the metadata: checking its signature would wait for a writer for ever
    index = index_dataset(root)
    assert len(index.frame) == 83 and [r for r in index.report.rows_without_images if image.stem in r]


def _junk_metadata(path: Path, rows: int, header: str = "lesion_id,image_id,dx,dx_type,age,sex,localization") -> None:
    with path.open("w") as fh:
        fh.write(header + "\n")
        fh.writelines(f"HAM_{i:07d},ISIC_{i:07d},nv,histo,50,male,back\n" for i in range(rows))


@pytest.mark.timeout(60)
def test_a_million_row_table_beside_three_images_is_refused_early(tiny_root, tmp_path):
    for image in sorted((tiny_root / "HAM10000_images_part_1").iterdir())[:3]:
        shutil.copy(image, tmp_path / image.name)
    _junk_metadata(tmp_path / "HAM10000_metadata.csv", 1_000_000)
    assert (tmp_path / "HAM10000_metadata.csv").stat().st_size > 30_000_000
    with pytest.raises(
        DatasetError,
        match="HAM10000_metadata.csv has more than 1,030 rows for the 3 image files "
        "found beside it, so it is not their metadata",
    ):
        index_dataset(tmp_path)
    # A table without the metadata's columns is refused from its header line alone.
    _junk_metadata(tmp_path / "HAM10000_metadata.csv", 1_000_000, header="a,b,c,d,e,f,g")
    with pytest.raises(DatasetError, match="has no image_id or dx column"):
        index_dataset(tmp_path)


@pytest.mark.timeout(30)
def test_a_wide_header_is_refused_before_the_table_is_parsed(tiny_root, tmp_path):
    # pandas took 93-138 s on a 140 KB header of 20,000 columns; the header line is bounded in bytes and columns.
    for image in sorted((tiny_root / "HAM10000_images_part_1").iterdir())[:3]:
        shutil.copy(image, tmp_path / image.name)
    table = tmp_path / "HAM10000_metadata.csv"
    wide = ",".join(["image_id", "dx", *(f"c{i}" for i in range(20_000))])
    table.write_text(wide + "\n" + "ISIC_0,nv" + "," * 20_000 + "\n")
    assert len(wide) > MAX_HEADER_BYTES
    with pytest.raises(DatasetError, match=f"header line longer than {MAX_HEADER_BYTES // 1024} KiB"):
        index_dataset(tmp_path)
    many = ",".join(["image_id", "dx", *(f"c{i}" for i in range(MAX_COLUMNS))])
    table.write_text(many + "\n" + "ISIC_0,nv" + "," * MAX_COLUMNS + "\n")
    assert len(many) < MAX_HEADER_BYTES
    with pytest.raises(DatasetError, match=f"{MAX_COLUMNS + 2:,} columns in its header; a metadata table has at most"):
        index_dataset(tmp_path)
    with pytest.raises(DatasetError, match="columns in its header"):
        read_table(table)


def test_a_table_within_the_row_limit_is_read_whole(tiny_root, tmp_path):
    # 84 images allow 10 × 84 + 1000 = 1840 rows: the 84 real rows and 1756 without an image.
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    with (root / "HAM10000_metadata.csv").open("a") as fh:
        fh.writelines(f"HAM_X{i},ISIC_X{i},nv,histo,50,male,back\r\n" for i in range(1756))
    index = index_dataset(root)
    assert len(index.frame) == 84 and len(index.report.rows_without_images) == 1756
    with (root / "HAM10000_metadata.csv").open("a") as fh:
        fh.write("HAM_Y,ISIC_Y,nv,histo,50,male,back\r\n")
    with pytest.raises(DatasetError, match="more than 1,840 rows for the 84 image files"):
        index_dataset(root)


def test_real_ham10000_indexes_completely(ham_root):
    index = index_dataset(ham_root)
    assert len(index.frame) == 10015 and index.frame["lesion_id"].nunique() == 7470
    assert index.report.ok
    assert index.class_counts().to_dict() == {
        "akiec": 327,
        "bcc": 514,
        "bkl": 1099,
        "df": 115,
        "mel": 1113,
        "nv": 6705,
        "vasc": 142,
    }
    # HAM10000_sources.csv beside the metadata: the four sources, every image's known.
    counts = index.source_counts()
    assert sorted(counts.index) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert counts.to_numpy().sum() == 10015 and (counts.sum(axis=0) == index.class_counts()).all()
    eligible, left_out = holdout_sources(index.frame)
    assert eligible == ["vidir_modern", "rosendahl"] and set(left_out) == {"vidir_molemax", "vienna_dias"}


def test_image_sources_come_from_the_sources_file_or_a_dataset_column(tiny_root, tmp_path):
    """Each image's source: "unknown" without any record, the sources file beside the metadata, or the metadata's own
    ``dataset`` column; counted per source and class."""
    assert not index_dataset(tiny_root).has_sources
    assert set(index_dataset(tiny_root).frame["source"]) == {UNKNOWN_SOURCE}
    root = tmp_path / "ds"
    shutil.copytree(tiny_root, root)
    meta = read_metadata(root / "HAM10000_metadata.csv")
    given = {image_id: ("rosendahl" if i % 3 else "vidir_modern") for i, image_id in enumerate(meta["image_id"][:-1])}
    (root / SOURCES_NAME).write_text("image_id,dataset\n" + "".join(f"{i},{s}\n" for i, s in given.items()))
    index = index_dataset(root)
    assert index.has_sources
    got = dict(zip(index.frame["image_id"], index.frame["source"], strict=True))
    assert got == {**given, meta["image_id"].iloc[-1]: UNKNOWN_SOURCE}  # the file does not list the last image
    counts = index.source_counts()
    assert list(counts.columns) == list(labels.CLASSES) and counts.to_numpy().sum() == len(meta)
    assert counts.loc["rosendahl"].sum() == sum(s == "rosendahl" for s in given.values())

    # A metadata file with its own dataset column needs no sources file (and wins over one).
    with_column = meta.assign(dataset=[f"clinic{i % 2}" for i in range(len(meta))])
    with_column[["lesion_id", "image_id", "dx", "dataset"]].to_csv(root / "HAM10000_metadata.csv", index=False)
    assert set(index_dataset(root).frame["source"]) == {"clinic0", "clinic1"}


def _lesion_frame(seed=0):
    rng = np.random.default_rng(seed)
    # HAM10000-like imbalance, with every class present.
    dx = rng.permutation(np.repeat(labels.CLASSES, [16, 20, 44, 8, 44, 252, 16]))
    per = rng.integers(1, 4, size=len(dx))
    rows = [(f"L{i}", f"I{i}_{k}", d) for i, (d, n) in enumerate(zip(dx, per, strict=True)) for k in range(n)]
    return pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"])


def test_split_groups_lesions_stratifies_and_is_deterministic():
    frame = _lesion_frame()
    split = split_by_lesion(frame, (0.7, 0.15, 0.15), seed=3)
    assert frame.assign(split=split).groupby("lesion_id")["split"].nunique().max() == 1
    assert split_by_lesion(frame, seed=3).equals(split)
    assert not split_by_lesion(frame, seed=4).equals(split)
    lesion_share = frame.assign(split=split).drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    assert lesion_share["train"] == pytest.approx(0.7, abs=0.02)
    assert lesion_share["test"] == pytest.approx(0.15, abs=0.02)
    counts = split_counts(frame, split)
    assert list(counts.index) == list(labels.CLASSES) and list(counts.columns) == ["train", "val", "test"]
    assert (counts > 0).all().all()  # every class present in every split
    with pytest.raises(ValueError):
        split_by_lesion(frame, (0.8, 0.3, 0.1))


def test_holding_out_a_source_tests_on_it_and_trains_on_no_view_of_its_lesions():
    frame = _lesion_frame()
    frame["source"] = np.where(frame.index % 3 == 0, "far", "home")
    split = split_by_lesion(frame, (0.7, 0.15, 0.15), seed=3, holdout_source="far")
    far = frame["source"] == "far"
    assert (split[far] == "test").all()
    shared = frame["lesion_id"].isin(frame.loc[far, "lesion_id"]) & ~far
    assert shared.any() and split[shared].isna().all()  # the other views of a held-out lesion are in no split
    rest = split[~far & ~shared]
    assert set(rest) == {"train", "val"}
    kept = frame[~far & ~shared].assign(split=rest)
    lesion_share = kept.drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    assert lesion_share["val"] == pytest.approx(0.15 / 0.85, abs=0.03)
    assert split.equals(split_by_lesion(frame, (0.7, 0.15, 0.15), seed=3, holdout_source="far"))
    with pytest.raises(SplitError, match="its sources are far, home"):
        split_by_lesion(frame, holdout_source="rosendahl")
    with pytest.raises(SplitError, match="not known"):
        split_by_lesion(frame.drop(columns="source"), holdout_source="far")


def test_a_source_is_held_out_only_with_enough_images_of_enough_classes():
    counts = {
        "broad": dict.fromkeys(labels.CLASSES, 40),
        "nevi": {"bkl": 124, "df": 30, "mel": 24, "nv": 3720, "vasc": 54},
        "two": {"mel": 67, "nv": 350},
    }
    rows = [(source, dx) for source, per in counts.items() for dx, n in per.items() for _ in range(n)]
    frame = pd.DataFrame(rows, columns=["source", "dx"])
    eligible, left_out = holdout_sources(pd.concat([frame, pd.DataFrame({"source": ["unknown"], "dx": ["nv"]})]))
    assert eligible == ["broad"] and set(left_out) == {"nevi", "two"}
    assert "4 classes with at least 30 images" in left_out["nevi"]
    assert "94% of its 3,952 images are nv" in left_out["nevi"]
    assert left_out["two"].startswith("2 classes") and "mel 67, nv 350" in left_out["two"]


def test_real_split_has_no_lesion_in_two_splits(ham_root):
    frame = index_dataset(ham_root).frame
    split = split_by_lesion(frame, seed=0)
    per_lesion = frame.assign(split=split).groupby("lesion_id")["split"].nunique()
    assert per_lesion.max() == 1
    test_share = (split == "test").mean()
    assert 0.13 < test_share < 0.17


def test_dataset_and_transforms_produce_normalised_tensors(tiny_root):
    frame = index_dataset(tiny_root).frame
    prep = Preprocessing(input_size=(48, 64), source_size=(40, 30))
    ds = LesionDataset.from_frame(frame, eval_transform(prep), prep)
    x, y = ds[0]
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32
    assert y == frame["label"].iloc[0]
    assert -3 < x.mean() < 3
    torch.manual_seed(0)
    aug = LesionDataset.from_frame(frame, train_transform(prep, "seed"), prep)
    assert not torch.equal(aug[0][0], x)
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_damaged_images_are_flagged_across_worker_processes_and_left_out_of_batches(tiny_root, tmp_path):
    frame = index_dataset(tiny_root).frame.head(6).copy()
    frame["path"] = [shutil.copy(p, tmp_path) for p in frame["path"]]
    damaged = [write_truncated_jpeg(frame["path"].iloc[i]) for i in (1, 4)]
    prep = Preprocessing(input_size=(32, 32))
    with pytest.raises(ImageError, match="damaged or truncated"):
        LesionDataset.from_frame(frame, eval_transform(prep), prep)[1]  # the evaluator's dataset reports it

    ds = LesionDataset.from_frame(frame, eval_transform(prep), prep, skip_damaged=True)
    # Two real worker processes decode the images, so the flags must cross into this process.
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [2, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(frame["label"].to_numpy()[[0, 2, 3, 5]]))
    assert ds.damaged_paths() == [str(p) for p in damaged]
    # A batch of damaged images only is empty, shaped for the model.
    inputs, targets = ds.collate([ds[1], ds[4]])
    assert inputs.shape == (0, 3, 32, 32) and targets.shape == (0,)
