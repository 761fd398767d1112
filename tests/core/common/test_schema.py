"""core.common.schema: a JSON file is bounded in bytes before it is parsed and in depth and values before its fields are
looked at; a closed schema refuses fields it does not list, an open one checks only those it lists."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from core.common.schema import Field, JsonFormat, SchemaError, check_schema, closed_schema, read_json_file, whole

SCHEMA = {"n": Field(True, whole("n", 0)), "m": Field(False, whole("m", 1))}
SMALL = JsonFormat("a small record", 1024, 2, 20, closed_schema(SCHEMA, "a small record"))


def test_a_sound_file_is_read(tmp_path):
    (tmp_path / "r.json").write_text('{"n": 3, "m": 1}')
    assert read_json_file(tmp_path / "r.json", SMALL) == {"n": 3, "m": 1}


def test_a_missing_file_is_not_a_damaged_one(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json_file(tmp_path / "r.json", SMALL)


def test_a_file_over_its_bound_is_refused_unparsed(tmp_path):
    # 50 MB of one JSON array: json.loads would build millions of values; only the bound plus one byte is read.
    (tmp_path / "r.json").write_text("[" + "0," * 25_000_000 + "0]")
    tracemalloc.start()
    with pytest.raises(SchemaError, match=r"^r.json is larger than a small record can be \(1.0 KiB at most\)$"):
        read_json_file(tmp_path / "r.json", SMALL)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize(
    "content, says",
    [
        ("{", "r.json is not a small record (not JSON)"),
        (b"\xff\xfe", "r.json is not a small record (not JSON)"),
        ("[" * 500 + "]" * 500, "r.json is not a small record: it nests deeper than 2 levels"),
        ('{"n": [[1]]}', "it nests deeper than 2 levels"),
        (json.dumps({"n": list(range(30))}), "it holds more than 20 values"),
        ("[1]", "it holds a list, not an object of fields"),
        ("{}", "n is missing"),
        ('{"n": 1, "x": 2}', "'x' is not a field of a small record"),
        ('{"n": -1}', "n must be a whole number from 0; got -1"),
        ('{"n": NaN}', "n must be a whole number from 0; got nan"),
        ('{"n": true}', "n must be a whole number from 0; got True"),
    ],
)
def test_a_malformed_file_is_refused_with_one_message(tmp_path, content, says):
    (tmp_path / "r.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SchemaError) as refused:
        read_json_file(tmp_path / "r.json", SMALL)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_an_open_schema_checks_the_fields_it_lists_and_lets_the_others_by():
    check_schema({"n": 1, "anything": [1]}, SCHEMA, "a record", closed=False)
    with pytest.raises(SchemaError, match="'anything' is not a field of a record"):
        check_schema({"n": 1, "anything": [1]}, SCHEMA, "a record")
    with pytest.raises(SchemaError, match="m must be a whole number from 1; got 0"):
        check_schema({"n": 1, "m": 0}, SCHEMA, "a record", closed=False)
