"""Public identifiers: ``<prefix>_<26 chars>``, time-ordered like a ULID.

The first 10 characters encode the creation time in milliseconds, the rest is random, so
sorting ids sorts by creation time: list endpoints page with ``WHERE id < :after`` and need
no extra index.
"""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
# RFC 4648 base32 digits → Crockford's: base64.b32encode does the bit slicing in C.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


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
    # 10 random bytes are exactly 16 base32 digits, most significant first, as ``_encode`` would
    # write them; one b32encode for the whole batch instead of a Python loop per digit.
    digits = base64.b32encode(os.urandom(10 * count)).translate(_FROM_RFC4648).decode()
    # Sorted so that ids follow the batch's order of queries within the same millisecond.
    tails = sorted(digits[i * 16 : i * 16 + 16] for i in range(count))
    return [f"{prefix}_{stamp}{tail}" for tail in tails]
