"""What a torch file holds, read before ``torch.load`` allocates anything.

``torch.load(weights_only=True)`` runs no code, but its allow-list still lets a file allocate what it asks for: a
98-byte pickle calling ``bytearray(4_000_000_000)`` reaches 4 GB before anything can be checked, a tensor may
claim more elements than its record holds, a deflated record may inflate a thousandfold, and a config of lists that
share one another forty levels deep is a few bytes to load and never ends to print. :func:`outline` reads the
archive's records (the member count from its end-of-central-directory record first, :func:`core.data.archives.
open_zip`) and unpickles ``data.pkl`` with an unpickler that knows only the names Lesion Lab's files use, turning
each tensor into a :class:`TensorRecord` of its dtype and shape after checking that its record holds it. The
result is checked for depth and size (:func:`check_structure`) before the file is loaded for real.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from core.common import schema
from core.data.archives import ArchiveError, open_zip, read_member

# A full DenseNet-121 last.pt (weights, batch-norm statistics, Adam's two moments and step per parameter) holds
# about 1,800 tensors, each its own record.
MAX_RECORDS = 10_000
# The pickle holds names, shapes and plain values, never tensor data: 50 KB for the reference model.
MAX_PICKLE_BYTES = 16 * 2**20
# Nesting and the number of values, counted along every path (so lists that share one another count each time
# they would be printed): a last.pt nests 5 deep (optimizer state, its per-parameter dicts, their tensors) and holds
# a few thousand values.
MAX_DEPTH = 8
MAX_VALUES = 200_000
# The records torch writes beside data.pkl; anything else is not from torch.save.
_RECORD = re.compile(r"[^/]+/(data\.pkl|data/\d+|\.data/[\w.]+|byteorder|version|\.format_version|\.storage_alignment)")
# Bytes per element of each storage type torch.save names.
_STORAGES = {
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
}


class UnsafeFile(ValueError):
    """A torch file that must not be loaded; the message says why, without the file's name."""


class ForeignName(UnsafeFile):
    """The pickle names a global outside the allow-list; ``name`` is it (``posix.system``, say)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as :func:`outline` sees it: its storage type and shape, checked against its record's size."""

    storage: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    name: str
    itemsize: int


@dataclass(frozen=True)
class _Storage:
    kind: _StorageType
    numel: int


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> TensorRecord:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: the tensor must lie within its storage."""
    if not (
        isinstance(storage, _Storage)
        and _whole(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(map(_whole, size + stride))
    ):
        raise UnsafeFile("a tensor is described with values torch.save never writes")
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if extent > storage.numel:
        raise UnsafeFile(f"a tensor of shape {list(size)} reaches past the {storage.numel:,} elements stored for it")
    return TensorRecord(storage.kind.name, size)


class _Outliner(pickle.Unpickler):
    def __init__(self, data: bytes, records: dict[str, int]):
        super().__init__(io.BytesIO(data))
        self.records = records

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _StorageType(name, _STORAGES[name])
        raise ForeignName(f"{module}.{name}")

    def persistent_load(self, pid: object) -> _Storage:
        # torch.save's storage reference: ("storage", type, key, location, number of elements).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeFile("a storage is described with values torch.save never writes")
        kind, key, numel = pid[1], pid[2], pid[4]
        stored = self.records.get(f"data/{key}")
        if stored is None or not _whole(numel):
            raise UnsafeFile(f"a tensor's data (record {key!r}) is missing")
        if numel * kind.itemsize > stored:
            raise UnsafeFile(f"a tensor claims {numel * kind.itemsize:,} bytes but its record holds {stored:,}")
        return _Storage(kind, numel)


def check_structure(value: object, what: str, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """UnsafeFile unless ``value`` is plain values (str, numbers, bool, None, :class:`TensorRecord`) in dicts,
    lists and tuples within the bounds (:func:`core.common.schema.check_structure`)."""
    try:
        schema.check_structure(
            value, what, max_depth=max_depth, max_values=max_values, leaves=(*schema.PLAIN_VALUES, TensorRecord)
        )
    except schema.SchemaError as exc:
        raise UnsafeFile(str(exc)) from None


def outline(path: str | Path) -> object:
    """The payload of the torch file ``path`` with :class:`TensorRecord` for its tensors, its structure checked
    (:func:`check_structure`); :class:`UnsafeFile` (or :class:`ForeignName`) saying why it must not be loaded."""
    try:
        with open_zip(path, "the file", max_members=MAX_RECORDS) as archive:
            infos = archive.infolist()
            for info in infos:
                if not _RECORD.fullmatch(info.filename):
                    raise UnsafeFile(f"it holds {info.filename!r}, which torch.save never writes")
                if info.compress_type != 0 or info.flag_bits & 0x1:
                    raise UnsafeFile(f"its record {info.filename!r} is compressed; torch.save stores records whole")
            size = Path(path).stat().st_size
            if sum(info.file_size for info in infos) > size:
                raise UnsafeFile("its records declare more bytes than the file holds")
            records = {info.filename.split("/", 1)[1]: info.file_size for info in infos}
            pickles = [info for info in infos if info.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
                raise UnsafeFile(f"it has no data.pkl record of at most {MAX_PICKLE_BYTES // 2**20} MiB")
            data = read_member(archive, pickles[0], "data.pkl", MAX_PICKLE_BYTES)
    except ArchiveError as exc:
        raise UnsafeFile(str(exc).replace("the file is ", "").rstrip(".")) from None
    try:
        payload = _Outliner(data, records).load()
    except UnsafeFile:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UnsafeFile(f"its data.pkl is not a pickle of tensors and plain values ({type(exc).__name__})") from None
    check_structure(payload, "it")
    return payload
