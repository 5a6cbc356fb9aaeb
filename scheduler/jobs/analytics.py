"""The analytics fold (SPEC §13): finished queries into the rollups, a page per transaction.

The work and its exactness (a cursor advanced in the transaction that applies the page, with the
cursor row locked) are ``shared.analytics.rollups``'; this job only bounds one run, so a backlog
(a new deployment over an old database) is caught up a few pages per tick without holding the
scheduler's thread for minutes.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from shared.analytics.rollups import PAGE, SETTLE_S, fold_finished

log = logging.getLogger("conclave.scheduler")

MAX_PAGES_PER_RUN = 20


def fold_analytics(sessions: sessionmaker[Session], now: int | None = None) -> int:
    folded = fold_finished(sessions, now=now, settle_s=SETTLE_S, page=PAGE, max_pages=MAX_PAGES_PER_RUN)
    if folded:
        log.info("analytics: folded %d finished queries", folded)
    return folded
