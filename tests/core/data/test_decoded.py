"""The decoded-image cache on real images: built once, reused, rebuilt when a file changes, damaged images
left out, and a clear refusal (and the JPEG path in training) when the disk has no room."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.common.runs import StopRequested
from core.data import decoded
from core.data.decoded import CacheUnavailable, open_decoded
from core.data.preprocessing import Preprocessing, load_for_model
from core.training.config import TrainConfig, config_with
from core.training.loop import train
from tests.conftest import ROOT, write_truncated_jpeg

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
PREP = Preprocessing(input_size=(150, 200), source_size=(200, 150))


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A copy of the bundled sample's metadata and its first 24 images: files a test may change."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    shutil.copy(SAMPLE / "HAM10000_metadata.csv", root)
    for image in sorted((SAMPLE / "images").glob("*.jpg"))[:24]:
        shutil.copy(image, root / "images")
    return root


def cache_files(cache_dir: Path) -> list[Path]:
    """What a cache folder holds besides its builders' lock file (empty, kept: removing it could race a waiter)."""
    return [p for p in cache_dir.rglob("*") if p.is_file() and p.name != "build.lock"]


def images_of(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "images").glob("*.jpg"))


def open_with_progress(paths, root, cache_dir, **options):
    calls = []
    cache = open_decoded(
        paths, PREP, root=root, cache_dir=cache_dir, progress=lambda d, t: calls.append((d, t)), **options
    )
    return cache, calls


def test_cache_holds_what_the_pil_path_decodes_and_is_reused(sample_copy, tmp_path):
    paths = images_of(sample_copy)
    cache, calls = open_with_progress(paths, sample_copy, tmp_path / "cache")

    assert cache.images.shape == (len(paths), 150, 200, 3) and cache.images.dtype == np.uint8
    assert cache.size == (200, 150) and cache.damaged == []
    assert calls[-1] == (len(paths), len(paths))
    for i in (0, 7, len(paths) - 1):
        assert np.array_equal(cache.images[i], np.asarray(load_for_model(paths[i], PREP)))
    assert list(cache.rows([paths[3], paths[1]])) == [3, 1]

    index = cache.folder / "index.json"
    stamp = index.stat().st_mtime_ns
    again, calls = open_with_progress(paths, sample_copy, tmp_path / "cache")
    assert index.stat().st_mtime_ns == stamp  # reused: nothing was written
    assert calls == [(len(paths), len(paths))]
    assert np.array_equal(again.images, cache.images)


def test_two_builders_at_once_build_it_one_after_the_other(sample_copy, tmp_path):
    """Two runs started together: the second waits for the first's cache and reads it, rather than unlinking and
    replacing its files half-way (which made one of them fail and fall back to the JPEG files)."""
    paths = images_of(sample_copy)
    first_decoded = threading.Event()

    def first_progress(done: int, total: int) -> None:
        first_decoded.set()
        time.sleep(1.5)  # the second starts while the first still holds its decoded array, not yet stored

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            open_decoded, paths, PREP, root=sample_copy, cache_dir=tmp_path / "cache", progress=first_progress
        )
        assert first_decoded.wait(60)
        second = pool.submit(open_with_progress, paths, sample_copy, tmp_path / "cache")
        a, (b, calls) = first.result(), second.result()
    assert calls == [(len(paths), len(paths))]  # read what the first built; decoded nothing itself
    assert a.folder == b.folder and np.array_equal(a.images, b.images) and b.images[-1].any()


def test_a_changed_file_rebuilds_the_cache(sample_copy, tmp_path):
    paths = images_of(sample_copy)
    first, _ = open_with_progress(paths, sample_copy, tmp_path / "cache")
    before = np.array(first.images[2])
    shutil.copy(paths[5], paths[2])  # same path, other content, size and mtime
    os.utime(paths[2], ns=(1, 1))
    (first.folder / "index.json").touch()
    stamp = (first.folder / "index.json").stat().st_mtime_ns

    rebuilt, _ = open_with_progress(paths, sample_copy, tmp_path / "cache")

    assert rebuilt.folder == first.folder and (rebuilt.folder / "index.json").stat().st_mtime_ns != stamp
    assert np.array_equal(rebuilt.images[2], rebuilt.images[5])
    assert not np.array_equal(rebuilt.images[2], before)
    index = json.loads((rebuilt.folder / "index.json").read_text())
    assert index["files"][2] == [paths[2], os.path.getsize(paths[2]), 1]


def test_a_removed_file_rebuilds_the_cache_without_it(sample_copy, tmp_path):
    paths = images_of(sample_copy)
    open_with_progress(paths, sample_copy, tmp_path / "cache")
    Path(paths[0]).unlink()
    smaller, _ = open_with_progress(paths[1:], sample_copy, tmp_path / "cache")
    assert smaller.images.shape[0] == len(paths) - 1
    assert np.array_equal(smaller.images[0], np.asarray(load_for_model(paths[1], PREP)))


def test_a_damaged_image_is_reported_and_left_blank(sample_copy, tmp_path):
    paths = images_of(sample_copy)
    write_truncated_jpeg(paths[4])
    cache, _ = open_with_progress(paths, sample_copy, tmp_path / "cache")
    assert cache.damaged == [paths[4]]
    assert not cache.images[4].any() and cache.images[3].any()


def test_no_room_says_so_and_leaves_nothing_behind(sample_copy, tmp_path):
    paths = images_of(sample_copy)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CacheUnavailable, match=r"needs 2\.\d MiB .* but the disk has"):
        open_decoded(paths, PREP, root=sample_copy, cache_dir=tmp_path / "cache", keep_free=free)
    assert cache_files(tmp_path / "cache") == []


def sample_run(tmp_path: Path, preset: str, **overrides) -> TrainConfig:
    """A run on the bundled sample, from ``preset``, with random weights on the CPU, writing below ``tmp_path``."""
    base = {
        "data": str(SAMPLE),
        "out": str(tmp_path / "runs"),
        "weights": "none",
        "epochs": 2,
        "batch_size": 16,
        "decoded_dir": str(tmp_path / "decoded"),
        "split_fractions": (0.5, 0.25, 0.25),
        "device": "cpu",
    }
    return config_with(preset, **{**base, **overrides})


def run_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_without_room_for_the_cache_trains_on_the_jpeg_files(tmp_path, monkeypatch, capsys):
    # More than the disk holds: no room, whatever other tests free meanwhile.
    monkeypatch.setattr(decoded, "KEEP_FREE_BYTES", shutil.disk_usage(tmp_path).total)
    cfg = sample_run(tmp_path, "seed", name="no-room", arch="mobilenet_v2", finetune="full", input_size=(32, 32))
    cfg = config_with(cfg, epochs=1, batch_size=8)
    events = run_events(train(cfg))
    fallback = [e for e in events if e["event"] == "input_pipeline"]
    assert len(fallback) == 1 and fallback[0]["pipeline"] == "jpeg"
    assert "reading the JPEG files instead" in capsys.readouterr().err
    assert events[-1] == {**events[-1], "event": "end", "status": "finished"}


def test_a_stop_while_decoding_ends_it_and_keeps_nothing(tmp_path):
    paths = images_of(SAMPLE)  # all 140: the stop is asked every 64 images
    asked = []

    def stop_on_second_ask() -> bool:
        asked.append(1)
        return len(asked) == 2

    with pytest.raises(StopRequested, match=f"stopped after decoding 128 of {len(paths)} images"):
        open_decoded(paths, PREP, root=SAMPLE, cache_dir=tmp_path / "cache", should_stop=stop_on_second_ask)
    assert cache_files(tmp_path / "cache") == []
    cache, _ = open_with_progress(paths, SAMPLE, tmp_path / "cache")  # the next run decodes them all
    assert cache.images.shape[0] == len(paths) and cache.images[-1].any()


def test_a_run_stopped_while_decoding_ends_stopped_before_its_first_epoch(tmp_path):
    cfg = sample_run(tmp_path, "seed", name="stop", arch="mobilenet_v2", finetune="full", input_size=(32, 32))
    run_dir = train(config_with(cfg, epochs=1), should_stop=lambda: True)
    events = run_events(run_dir)
    assert events[-1] == {**events[-1], "event": "end", "status": "stopped"}
    assert not [e for e in events if e["event"] == "epoch"]
    assert not list((tmp_path / "decoded").rglob("images.npy*"))


# The malformed-input corpus of index.json: each is refused by INDEX_SCHEMA (or its bounds) and the cache is decoded
# again with progress, ending as the sound cache. Before the schema, a shape or damaged list of another type raised
# TypeError on every run, brackets nested past the parser RecursionError, and a damaged list naming a file the cache
# does not hold (or a file of any length) was taken as it was.
INDEX_CORPUS = {
    "not JSON": lambda index: "{",
    "a list": lambda index: "[1, 2]",
    "nested past the parser": lambda index: "[" * 30_000 + "]" * 30_000,
    "shape a number": lambda index: {**index, "shape": 5},
    "shape of text": lambda index: {**index, "shape": ["150", "200", "3"]},
    "shape of two sides": lambda index: {**index, "shape": [150, 200]},
    "damaged not a list": lambda index: {**index, "damaged": None},
    "damaged a file it does not hold": lambda index: {**index, "damaged": ["/etc/passwd"]},
    "field unknown": lambda index: {**index, "blob": [1]},
    "longer than any index of these files": lambda index: json.dumps(index) + " " * 5_000_000,
    "format unknown": lambda index: {**index, "format": 99},
}


@pytest.mark.parametrize("case", INDEX_CORPUS)
def test_a_damaged_index_is_refused_and_the_cache_decoded_again(sample_copy, tmp_path, case):
    paths = images_of(sample_copy)
    sound, _ = open_with_progress(paths, sample_copy, tmp_path / "cache")
    index_file = sound.folder / "index.json"
    index = json.loads(index_file.read_text())
    damaged = INDEX_CORPUS[case](index)
    index_file.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    built_before = (sound.folder / "images.npy").stat().st_ino

    cache, calls = open_with_progress(paths, sample_copy, tmp_path / "cache")

    assert (sound.folder / "images.npy").stat().st_ino != built_before  # decoded again, not read
    assert calls[-1] == (len(paths), len(paths))
    assert json.loads(index_file.read_text()) == index
    np.testing.assert_array_equal(cache.images, sound.images)
    assert cache.damaged == sound.damaged == []
