"""Public identifiers: ``<prefix>_<26 chars>``, time-ordered like a ULID.

The first 10 characters encode the creation time in milliseconds, the rest is random, so
sorting ids sorts by creation time: list endpoints page with ``WHERE id < :after`` and need
no extra index.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_encode(ms, 10)}{_encode(rand, 16)}"


def new_ids(prefix: str, count: int) -> list[str]:
    """``count`` ids sharing one timestamp, in ascending order (insertion order = id order)."""
    ms = int(time.time() * 1000)
    stamp = _encode(ms, 10)
    raw = os.urandom(10 * count)
    # Sorted so that ids follow the batch's order of queries within the same millisecond.
    tails = sorted(_encode(int.from_bytes(raw[i * 10 : i * 10 + 10], "big"), 16) for i in range(count))
    return [f"{prefix}_{stamp}{tail}" for tail in tails]
