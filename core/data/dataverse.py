"""A small client for the two Dataverse APIs that "Get the dataset" needs (stdlib only).

* Native API, ``GET {server}/api/datasets/:persistentId/?persistentId=DOI``: the
  latest version's files, each with its id, name, size and checksum.
* Data Access API, ``GET {server}/api/access/datafile/{id}``: the bytes, resumable
  with an HTTP ``Range`` request. Harvard answers with a redirect to its object
  store; urllib follows it and keeps the ``Range`` header.

Files that Dataverse *ingested* (tables shown as ``.tab``) are special: the
published checksum and ``originalFileSize`` belong to the file as uploaded, which
``?format=original`` returns, not to the generated tab-separated version. This
client always fetches the original so that every file can be verified.

Every failure is a :class:`DownloadError` whose message says what happened and
what to do about it.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import PurePosixPath

DEFAULT_SERVER = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
TIMEOUT_S = 60.0
_USER_AGENT = "lesion-lab/0.1 (HAM10000 downloader)"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
_RESUME_HINT = "Files already downloaded are kept and partial ones resume: run the download again."


class DownloadError(Exception):
    """A download that cannot go on. Raising it never deletes verified or partially downloaded data."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset version, described as the data-access API will deliver it."""

    id: int
    label: str  # the name the dataset page shows, e.g. HAM10000_metadata.tab
    name: str  # the name the downloaded bytes get: the uploaded original's name for ingested tables
    size: int | None  # bytes to expect; None when the server does not say
    checksum_type: str | None  # "MD5", "SHA-1", "SHA-256" or "SHA-512"
    checksum: str | None
    original: bool  # an ingested table, fetched with ?format=original
    restricted: bool = False
    description: str = ""


def list_files(
    server: str = DEFAULT_SERVER, persistent_id: str = HAM10000_DOI, *, timeout: float = TIMEOUT_S
) -> list[RemoteFile]:
    """The files of the latest version of the dataset ``persistent_id`` (e.g. ``doi:10.7910/DVN/DBW86T``)."""
    query = urllib.parse.urlencode({"persistentId": persistent_id})
    url = f"{server.rstrip('/')}/api/datasets/:persistentId/?{query}"
    what = f"the file list of dataset {persistent_id}"
    response = _get(url, what, timeout)
    with response:
        try:
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"The connection to {_host(url)} broke while reading {what} ({exc}). {_RESUME_HINT}"
            ) from None
    try:
        entries = json.loads(body)["data"]["latestVersion"]["files"]
        return [_remote_file(entry) for entry in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise DownloadError(
            f"{_host(url)} answered the request for {what} with something that is not a Dataverse dataset "
            f"description ({type(exc).__name__}: {exc}). Check that the server address is a Dataverse installation."
        ) from None


def open_file(
    server: str, remote: RemoteFile, start: int = 0, *, timeout: float = TIMEOUT_S
) -> tuple[http.client.HTTPResponse, int]:
    """Open ``remote`` for reading from byte ``start``; returns the response and the offset its body starts at.

    The offset is ``start`` when the server honoured the Range request and 0 when
    it sent the whole file instead; the caller must then start over.
    """
    url = f"{server.rstrip('/')}/api/access/datafile/{remote.id}" + ("?format=original" if remote.original else "")
    if start > 0:
        try:
            response = _urlopen(url, timeout, {"Range": f"bytes={start}-"})
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code != 416:
                raise _explain(exc, url, remote.name) from None
            # 416: the partial file is at least as long as the server's copy, which must have changed.
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _explain(exc, url, remote.name) from None
        else:
            if response.status == 200:
                return response, 0
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if response.status == 206 and match and int(match.group(1)) == start:
                return response, start
            response.close()  # a range we did not ask for: safer to start over than to splice
    return _get(url, remote.name, timeout), 0


def _remote_file(entry: dict) -> RemoteFile:
    data = entry["dataFile"]
    original = bool(data.get("originalFileFormat"))
    checksum = data.get("checksum") or ({"type": "MD5", "value": data["md5"]} if data.get("md5") else {})
    label = entry.get("label") or data["filename"]
    name = (data.get("originalFileName") if original else None) or data.get("filename") or label
    size = data.get("originalFileSize") if original else data.get("filesize")
    return RemoteFile(
        id=int(data["id"]),
        label=label,
        name=_plain_name(name),
        size=int(size) if size is not None else None,
        checksum_type=checksum.get("type"),
        checksum=checksum.get("value"),
        original=original,
        restricted=bool(entry.get("restricted", False)),
        description=entry.get("description") or data.get("description") or "",
    )


def _plain_name(name: str) -> str:
    # The name becomes a path on this machine: a server must not be able to write outside the data folder.
    plain = PurePosixPath(name.replace("\\", "/")).name
    if plain in ("", ".", ".."):
        raise DownloadError(f"The server listed a file with the unusable name {name!r}.")
    return plain


def _urlopen(url: str, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(request, timeout=timeout)


def _get(url: str, what: str, timeout: float) -> http.client.HTTPResponse:
    try:
        return _urlopen(url, timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _explain(exc, url, what) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _explain(exc, url, what) from None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _explain(exc: Exception, url: str, what: str) -> DownloadError:
    host = _host(url)
    if isinstance(exc, urllib.error.HTTPError):
        status = f"HTTP {exc.code} {exc.reason}".strip()
        if exc.code >= 500:
            return DownloadError(
                f"The server {host} failed while sending {what} ({status}). The problem is on the server's side: "
                f"try again later. {_RESUME_HINT}"
            )
        if exc.code == 404:
            return DownloadError(f"{host} has no {what} ({status}). Check the server address and the dataset DOI.")
        if exc.code in (401, 403):
            return DownloadError(
                f"{host} refused to send {what} ({status}). The file may be restricted, or the dataset may ask you "
                "to accept its terms: open the dataset page in a browser."
            )
        return DownloadError(f"{host} refused the request for {what} ({status}). Try again later.")
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return DownloadError(f"{host} did not answer within the time limit while sending {what}. {_RESUME_HINT}")
    return DownloadError(
        f"Cannot reach {host} to get {what} ({reason}). Check the internet connection (and any proxy or "
        f"firewall). {_RESUME_HINT}"
    )
