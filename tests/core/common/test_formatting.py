"""The formatters of core.common.formatting: byte sizes in binary units, probabilities against a threshold."""

from __future__ import annotations

import pytest

from core.common.formatting import format_bytes, percents_against


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


@pytest.mark.parametrize(
    ("p", "threshold", "texts"),
    [
        (0.159, 0.156711, ("15.9%", "15.7%")),  # "16%" would read as 15.9% at or above 16%
        (0.80, 0.156711, ("80.0%", "15.7%")),
        (0.15669, 0.156711, ("15.669%", "15.671%")),  # alike at one and two decimals, yet below
        (0.156711, 0.156711, ("15.7%", "15.7%")),  # equal is at or above
        (0.15674, 0.156711, ("15.7%", "15.7%")),  # at or above, and reads so
    ],
)
def test_percents_against_keeps_the_order_visible(p, threshold, texts):
    assert percents_against(p, threshold) == texts
    shown_p, shown_t = (float(t.rstrip("%")) for t in texts)
    assert (shown_p >= shown_t) == (p >= threshold)
