"""Human-readable quantities for messages, the command line and the pages."""

from __future__ import annotations

import time
from collections.abc import Callable

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with IEC labels: "512 B", "1.5 KiB", "2.6 GiB".

    Binary, because what these sizes are read against counts in powers of 1024 (Streamlit's upload limit
    is ``maxUploadSize`` × 1024² bytes; ``df -h`` shows free space the same way); the IEC labels say so,
    where "MB" would be ambiguous.
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit in _BINARY_UNITS:
        n /= 1024
        # Round before comparing, so that 1 048 575 bytes reads "1.0 MiB", not "1024.0 KiB".
        if round(n, 1) < 1024 or unit == _BINARY_UNITS[-1]:
            break
    return f"{n:.1f} {unit}"


def format_duration(s: float) -> str:
    """Seconds as a person reads them: 42 s, 3 min 05 s, 1 h 02 min."""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _count(n: float) -> str:
    return f"{int(round(n)):,}"


def percents_against(p: float, threshold: float) -> tuple[str, str]:
    """``p`` and ``threshold`` as percentages, with the fewest decimals (one to four) at which the written
    numbers compare as the real ones do.

    A threshold of 0.1567 written "16%" beside a probability of 15.9% "at or above" it reads as a
    contradiction; at one decimal it is "15.7%", and where two values still round alike the next decimal
    tells them apart."""
    for digits in range(1, 5):
        shown_p, shown_t = round(p * 100, digits), round(threshold * 100, digits)
        if (shown_p >= shown_t) == (p >= threshold):
            break
    return f"{p:.{digits}%}", f"{threshold:.{digits}%}"


def progress_fraction(done: float, total: float | None) -> float:
    """How full a progress bar is, 0..1; empty while the total is unknown."""
    return min(1.0, max(0.0, done / total)) if total else 0.0


def progress_text(
    label: str,
    done: float,
    total: float | None,
    *,
    started: float,
    base: float = 0,
    now: float | None = None,
    unit: str = "images",
    amount: Callable[[float], str] = _count,
) -> str:
    """One line for a long step's progress bar: "label: done/total unit · rate unit/s · ETA …".

    The rate is the average since ``started`` (a Unix time, as the step recorded it), when ``base`` was
    already done (a resumed download), and the ETA the rest at that rate; both appear once something is done
    since. ``amount`` writes a quantity (e.g. :func:`format_bytes`, with ``unit=""``)."""
    now = time.time() if now is None else now
    counted = f"{amount(done)}/{amount(total)}" if total else amount(done)
    parts = [f"{label}: {counted} {unit}".rstrip()]
    elapsed = now - started
    if done > base and elapsed > 0:
        rate = (done - base) / elapsed
        parts.append(f"{amount(rate)} {unit}/s" if unit else f"{amount(rate)}/s")
        if total and done < total:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
    return " · ".join(parts)
