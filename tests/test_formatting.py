"""The one byte-size formatter: binary units with IEC labels."""

from __future__ import annotations

import pytest

from core.formatting import format_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),  # rounds up into the next unit, never "1024.0 KiB"
        (10 * 2**20, "10.0 MiB"),
        (2_800_000_000, "2.6 GiB"),  # binary: 2.8 GB in SI units
        (3 * 2**40, "3.0 TiB"),
        (5 * 2**50, "5120.0 TiB"),  # the largest unit has no ceiling
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
