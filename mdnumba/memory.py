"""How much memory this machine can give, and byte counts as the memory errors write them."""

from __future__ import annotations

import sys
from decimal import Decimal


def available_memory() -> int | None:
    """Bytes the kernel can give to a process without swapping (Linux ``MemAvailable``), or None
    where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB (from 1 GiB on; beyond 10**6 GiB in 3 digits, exact for any int) or MiB."""
    if n >= 10**6 * 2**30:
        return f"{Decimal(n) / 2**30:.3g} GiB"  # a float would overflow past ~1e308
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def require_memory(need: int, what: str, parts: str = "", margin: float = 1.0, fix: str = "") -> None:
    """MemoryError ``<what> <need> <parts>, this machine has <free> available[; <fix>]`` if ``need``
    bytes (times ``margin``, for an estimate) exceed :func:`available_memory` (or, where it is
    unknown, what a process can address)."""
    free = available_memory()
    if need * margin > (sys.maxsize if free is None else free):
        have = "more than a process can address" if free is None else \
            f"this machine has {format_bytes(free)} available"
        room = f" (with {margin - 1:.0%} room for the estimate's error: {format_bytes(int(need * margin))})" \
            if margin != 1 else ""
        raise MemoryError(f"{what} {format_bytes(need)}{' ' + parts if parts else ''}{room}, {have}"
                          f"{'; ' + fix if fix else ''}")
