"""Downloading from a real HTTP server on loopback that answers like the Dataverse native and access APIs.

The server lists the files of doi:10.7910/DVN/DBW86T under their real names and ids,
redirects file access to a storage URL as Harvard does, honours Range requests, serves
ingested tables as Dataverse does (archival .tab by default, the checksummed original
with ?format=original) and can fail on demand: HTTP errors, transfers cut off halfway,
damaged bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from core.cli.download import main
from core.data.dataset import index_dataset
from core.data.dataverse import HAM10000_DOI, DownloadError, RemoteFile
from core.data.download import EXTERNAL, STATE_DIR, TRAINING, download_dataset, list_dataset_files, role_of
from tests.conftest import make_image, write_tiny_dataset, zip_bytes

PART_1, PART_2, METADATA, TEST_IMAGES, TEST_TRUTH, SEGMENTATIONS = 3172585, 3172584, 4338392, 3855824, 6924466, 3838943


@dataclass
class Served:
    id: int
    label: str
    body: bytes  # what plain access returns (for ingested tables: the generated .tab)
    original: bytes | None = None  # ingested tables only: the uploaded file, which the checksum is for
    original_name: str | None = None
    checksum_type: str = "MD5"

    def entry(self) -> dict:
        verified = self.original if self.original is not None else self.body
        algorithm = {"MD5": "md5", "SHA-256": "sha256"}[self.checksum_type]
        data = {
            "id": self.id,
            "filename": self.label,
            "contentType": "text/tab-separated-values" if self.label.endswith(".tab") else "application/zip",
            "filesize": len(self.body),
            "checksum": {"type": self.checksum_type, "value": hashlib.new(algorithm, verified).hexdigest()},
        }
        if self.original is not None:
            data |= {
                "originalFileFormat": "text/csv",
                "originalFileSize": len(self.original),
                "originalFileName": self.original_name,
            }
        return {"label": self.label, "restricted": False, "version": 1, "dataFile": data}


def quoted_tab(csv_text: str) -> bytes:
    """Dataverse's archival form of an ingested table: tab-separated, strings in double quotes."""
    out = []
    for line in csv_text.strip().splitlines():
        cells = line.split(",")
        out.append("\t".join(c if re.fullmatch(r"[\d.]+", c) else f'"{c}"' for c in cells))
    return ("\n".join(out) + "\n").encode()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[int, Served]:
    src = write_tiny_dataset(tmp_path_factory.mktemp("dataverse_src"), per_class=2)
    part_1 = {p.name: p.read_bytes() for p in sorted((src / "HAM10000_images_part_1").iterdir())}
    # One archive flat, the other inside a top folder: both occur in the wild.
    part_2 = {
        f"HAM10000_images_part_2/{p.name}": p.read_bytes() for p in sorted((src / "HAM10000_images_part_2").iterdir())
    }
    metadata_csv = (src / "HAM10000_metadata.csv").read_bytes()
    rng = np.random.default_rng(7)
    test_images = {}
    for n, label in enumerate([4, 5, 1]):
        buffer = io.BytesIO()
        make_image(label, rng).save(buffer, "JPEG")
        test_images[f"ISIC2018_Task3_Test_Images/ISIC_{34524 + n:07d}.jpg"] = buffer.getvalue()
    truth = (
        "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
        "HAMTEST_0000001,ISIC_0034524,mel,histo,55,male,back,vidir_modern\n"
        "HAMTEST_0000002,ISIC_0034525,nv,follow_up,40,female,trunk,vidir_molemax\n"
        "HAMTEST_0000003,ISIC_0034526,bcc,histo,70,male,face,rosendahl\n"
        "HAMTEST_0000004,ISIC_0035068,nv,,,,,\n"
    )  # listed without an image, as in the real file
    files = [
        Served(PART_1, "HAM10000_images_part_1.zip", zip_bytes(part_1)),
        Served(PART_2, "HAM10000_images_part_2.zip", zip_bytes(part_2), checksum_type="SHA-256"),
        Served(
            METADATA, "HAM10000_metadata.tab", quoted_tab(metadata_csv.decode()), metadata_csv, "HAM10000_metadata.csv"
        ),
        Served(TEST_IMAGES, "ISIC2018_Task3_Test_Images.zip", zip_bytes(test_images)),
        Served(TEST_TRUTH, "ISIC2018_Task3_Test_GroundTruth.tab", quoted_tab(truth)),
        Served(SEGMENTATIONS, "HAM10000_segmentations_lesion_tschandl.zip", zip_bytes({"mask.png": b"x"})),
    ]
    return {f.id: f for f in files}


class FakeDataverse(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[int, Served]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[tuple[int, str | None, str]] = []  # (file id, Range header, query) per storage GET
        self.fail: dict[str, int] = {}  # "list" or "file" -> HTTP status to answer with
        self.truncate: set[int] = set()  # ids whose transfer stops halfway, once
        self.corrupt: set[int] = set()  # ids served with one byte changed
        self.sizes: dict[int, int] = {}  # ids whose listed size is overridden

    def listing(self) -> bytes:
        entries = []
        for f in self.files.values():
            entry = f.entry()
            if f.id in self.sizes:
                entry["dataFile"]["filesize"] = self.sizes[f.id]
            entries.append(entry)
        return json.dumps(
            {
                "status": "OK",
                "data": {
                    "id": 3172583,
                    "latestVersion": {"versionNumber": 4, "versionMinorNumber": 0, "files": entries},
                },
            }
        ).encode()


class Handler(BaseHTTPRequestHandler):
    server: FakeDataverse

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str) -> None:
        self.send(status, json.dumps({"status": "ERROR", "message": message}).encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/api/datasets/:persistentId/":
            if "list" in self.server.fail:
                return self.error(self.server.fail["list"], "Internal server error")
            if query.get("persistentId") != [HAM10000_DOI]:
                return self.error(404, "Dataset not found")
            return self.send(200, self.server.listing())
        if match := re.fullmatch(r"/api/access/datafile/(\d+)", url.path):
            # Harvard hands file bytes out from its object store, behind a redirect.
            return self.send(303, b"", "text/plain", Location=f"/store/{match.group(1)}?{url.query}")
        if match := re.fullmatch(r"/store/(\d+)", url.path):
            return self.serve_file(int(match.group(1)), query)
        self.error(404, "no such endpoint")

    def serve_file(self, file_id: int, query: dict) -> None:
        served = self.server.files[file_id]
        byte_range = self.headers.get("Range")
        self.server.requests.append((file_id, byte_range, "&".join(f"{k}={v[0]}" for k, v in query.items())))
        if "file" in self.server.fail:
            return self.error(self.server.fail["file"], "Internal server error")
        wants_original = query.get("format") == ["original"] and served.original is not None
        data = served.original if wants_original else served.body
        if file_id in self.server.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1)) if byte_range else 0
        if start >= len(data) > 0:
            return self.send(416, b"", "text/plain", Content_Range=f"bytes */{len(data)}")
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if file_id in self.server.truncate:
            self.server.truncate.discard(file_id)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-transfer
            return
        self.wfile.write(body)


@pytest.fixture
def server(dataset):
    srv = FakeDataverse(dict(dataset))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetched(server: FakeDataverse) -> list[int]:
    return [file_id for file_id, _, _ in server.requests]


def test_roles_follow_the_real_file_names():
    def remote(label: str, name: str | None = None) -> RemoteFile:
        return RemoteFile(1, label, name or label, 1, "MD5", "0", False)

    assert role_of(remote("HAM10000_images_part_1.zip")) == TRAINING
    assert role_of(remote("HAM10000_metadata.tab", "HAM10000_metadata.csv")) == TRAINING
    assert role_of(remote("HAM10000_metadata")) == TRAINING
    assert role_of(remote("ISIC2018_Task3_Test_Images.zip")) == EXTERNAL
    assert role_of(remote("ISIC2018_Task3_Test_GroundTruth.tab", "ISIC2018_Task3_Test_GroundTruth.csv")) == EXTERNAL
    assert role_of(remote("HAM10000_segmentations_lesion_tschandl.zip")) is None
    assert role_of(remote("ISIC2018_Task3_Test_NatureMedicine_AI_Interaction_Benefit.tab")) is None


def test_full_download_extracts_verifies_and_validates(server, tmp_path):
    dest, external = tmp_path / "ham", tmp_path / "isic-test"
    seen = []
    summary = download_dataset(
        dest, server=server.url, include_external=True, external_dest=external, progress=seen.append
    )

    assert (dest / "HAM10000_metadata.csv").read_bytes() == server.files[METADATA].original
    assert len(list((dest / "HAM10000_images_part_1").glob("*.jpg"))) == 7
    assert len(list((dest / "HAM10000_images_part_2").glob("*.jpg"))) == 7
    assert not list((dest / STATE_DIR).glob("*.part"))  # archives removed once extracted
    assert SEGMENTATIONS not in fetched(server)
    assert (METADATA, None, "format=original") in server.requests  # the checksummed original, not the .tab
    assert summary.report.ok and summary.report.rows_read == 14
    assert sorted(summary.downloaded) == sorted(
        [
            "HAM10000_metadata.csv",
            "HAM10000_images_part_1.zip",
            "HAM10000_images_part_2.zip",
            "ISIC2018_Task3_Test_Images.zip",
            "ISIC2018_Task3_Test_GroundTruth.tab",
        ]
    )
    assert summary.unverified == []
    assert len(index_dataset(dest).frame) == 14

    assert summary.external_report.rows_without_images == ["row 5: ISIC_0035068"]
    assert len(list((external / "ISIC2018_Task3_Test_Images").glob("*.jpg"))) == 3
    assert {p.stage for p in seen} == {"download", "verify", "extract"}
    assert all(p.done <= p.total for p in seen)
    assert "No problems found." in summary.text()


def test_rerun_skips_verified_files(server, tmp_path):
    download_dataset(tmp_path / "ham", server=server.url)
    server.requests.clear()
    summary = download_dataset(tmp_path / "ham", server=server.url)
    assert server.requests == []
    assert summary.downloaded == [] and len(summary.skipped) == 3
    assert summary.report.ok


def test_truncated_transfer_resumes_with_range(server, tmp_path):
    dest = tmp_path / "ham"
    server.truncate.add(PART_1)
    with pytest.raises(DownloadError, match="stopped after .* run the download again to resume") as info:
        download_dataset(dest, server=server.url)
    assert "HAM10000_images_part_1.zip" in str(info.value)
    part = dest / STATE_DIR / "HAM10000_images_part_1.zip.part"
    size = len(server.files[PART_1].body)
    assert 0 < part.stat().st_size < size
    assert not (dest / "HAM10000_images_part_1").exists()  # nothing installed from a partial file

    server.requests.clear()
    summary = download_dataset(dest, server=server.url)
    assert (PART_1, f"bytes={size // 2}-", "") in server.requests
    assert summary.skipped == ["HAM10000_metadata.csv"]  # finished before the failure, not fetched again
    assert summary.report.ok and len(index_dataset(dest).frame) == 14


def test_checksum_mismatch_installs_nothing(server, tmp_path):
    dest = tmp_path / "ham"
    server.corrupt.add(PART_2)
    with pytest.raises(DownloadError, match="HAM10000_images_part_2.zip failed its SHA-256 check") as info:
        download_dataset(dest, server=server.url)
    assert "nothing from it was installed" in str(info.value)
    assert not (dest / "HAM10000_images_part_2").exists()
    assert not (dest / STATE_DIR / "HAM10000_images_part_2.zip.part").exists()  # no resuming from bad bytes

    server.corrupt.clear()
    server.requests.clear()
    download_dataset(dest, server=server.url)
    assert fetched(server) == [PART_2]  # only the damaged file again, from the start
    assert server.requests[0][1] is None


def test_server_errors_are_explained(server, tmp_path):
    server.fail["file"] = 500
    with pytest.raises(DownloadError, match=r"failed while sending HAM10000_metadata.csv \(HTTP 500"):
        download_dataset(tmp_path / "ham", server=server.url)
    server.fail = {"list": 503}
    with pytest.raises(DownloadError, match="HTTP 503.*try again later"):
        download_dataset(tmp_path / "ham", server=server.url)
    server.fail = {}
    with pytest.raises(DownloadError, match="HTTP 404.*Check the server address and the dataset DOI"):
        download_dataset(tmp_path / "ham", server=server.url, persistent_id="doi:10.7910/DVN/NOPE00")


def test_unreachable_server_fails_fast(tmp_path):
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot reach 127.0.0.1.*internet connection"):
        download_dataset(tmp_path / "ham", server=f"http://127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "ham").exists()


def test_not_enough_disk_space_is_refused_up_front(server, tmp_path):
    server.sizes[PART_1] = 10**18  # an exabyte: more than any disk holds
    with pytest.raises(DownloadError, match="Not enough free disk space.*nothing was downloaded"):
        download_dataset(tmp_path / "ham", server=server.url)
    assert server.requests == []


def test_write_failure_keeps_the_partial_file(server, tmp_path):
    """A real failing write: the process file-size limit makes the OS refuse bytes past 4000 (EFBIG),
    as a full disk refuses them with ENOSPC."""
    dest = tmp_path / "ham"
    limit = 4000
    assert len(server.files[PART_1].body) > limit > len(server.files[METADATA].original)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an error instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(DownloadError, match="run the download again to continue") as info:
            download_dataset(dest, server=server.url)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    part = dest / STATE_DIR / "HAM10000_images_part_1.zip.part"
    assert str(part) in str(info.value)
    assert part.stat().st_size == limit

    server.requests.clear()
    summary = download_dataset(dest, server=server.url)
    assert (PART_1, f"bytes={limit}-", "") in server.requests
    assert summary.report.ok


def test_unsafe_archive_is_not_extracted(server, tmp_path):
    evil = zip_bytes({"../../escaped.jpg": b"\xff\xd8\xff", "ISIC_0000001.jpg": b"\xff\xd8\xff"})
    server.files[PART_1] = Served(PART_1, "HAM10000_images_part_1.zip", evil)
    with pytest.raises(DownloadError, match="unsafe path '../../escaped.jpg'"):
        download_dataset(tmp_path / "data" / "ham", server=server.url)
    assert not list(tmp_path.rglob("escaped.jpg"))
    assert not list(tmp_path.rglob("ISIC_0000001.jpg"))


def test_command_line(server, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--external" in capsys.readouterr().out

    assert main(["--list", "--server", server.url]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"HAM10000_images_part_1.zip .* MD5 +training", listing)
    assert re.search(r"ISIC2018_Task3_Test_Images.zip .* external test set", listing)
    assert re.search(r"HAM10000_segmentations_lesion_tschandl.zip .* not used", listing)

    assert main(["--dest", str(tmp_path / "ham"), "--server", server.url, "--external"]) == 0
    out, err = capsys.readouterr()
    assert "No problems found." in out and f"{tmp_path / 'ham-isic2018-test'}" in out
    assert "download" in err and "100%" in err  # the progress bar

    server.fail["list"] = 500
    assert main(["--dest", str(tmp_path / "ham"), "--server", server.url]) == 1
    assert "error: The server 127.0.0.1" in capsys.readouterr().err


def test_listing_names_each_role(server):
    roles = {remote.name: role for remote, role in list_dataset_files(server.url)}
    assert roles["HAM10000_metadata.csv"] == TRAINING
    assert roles["ISIC2018_Task3_Test_GroundTruth.tab"] == EXTERNAL
    assert roles["HAM10000_segmentations_lesion_tschandl.zip"] is None
