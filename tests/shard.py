"""``I/K`` shards: every K-th item from the I-th on (0 <= I < K), for splitting slow test
work over concurrent processes (``MDNUMBA_TEST_SHARD`` in conftest.py, ``ptxcheck.py --shard``)."""

from __future__ import annotations


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/K"`` -> (I, K); ValueError unless both are integers with 0 <= I < K."""
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"expected I/K, got {text!r}") from None
    if not 0 <= i < k:
        raise ValueError(f"need 0 <= I < K, got {text!r}")
    return i, k
