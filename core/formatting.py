"""Human-readable quantities for messages, the command line and the pages."""

from __future__ import annotations

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
