"""``Retry-After`` (RFC 9110 §10.2.3): delay-seconds or an HTTP date, as seconds to wait.

One parser for every place that honours the header: provider answers (``shared/providers``),
webhook receivers (``shared/webhooks/delivery.py``) and our own API as the CLI client sees it.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

_DELAY_SECONDS = re.compile(r"\d{1,10}(\.\d{1,6})?", re.ASCII)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date); never negative.

    None when absent or unparsable; a date in the past means 0. A date without a zone (the
    obsolete asctime form) is GMT, as RFC 9110 says every HTTP date is.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
