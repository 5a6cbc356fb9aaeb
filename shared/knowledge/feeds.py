"""Feeds and articles as the API shows them, and importing one feed (fetch → parse → store).

Routes call the first half; the scheduler's feed job calls ``import_feed``. An import failure of
any kind is recorded on the feed (``last_error``, ``consecutive_failures``) and never raised:
one broken feed must not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.errors import InvalidField, NotFound
from shared.ids import new_id
from shared.knowledge.fetch import FetchError, fetch_feed, make_fetch_client
from shared.knowledge.parse import ParseError, parse_feed
from shared.knowledge.store import ImportCounts, delete_feed_articles, store_articles
from shared.models import Article, ArticleVersion, Feed
from shared.webhooks.ssrf import UnsafeURL, check_url

log = logging.getLogger("conclave.knowledge")

MAX_FEEDS = 100


def feed_object(f: Feed) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "feed",
        "url": f.url,
        "domain": f.domain,
        "interval_minutes": f.interval_minutes,
        "last_success_at": f.last_success_at,
        "last_error": f.last_error,
        "consecutive_failures": f.consecutive_failures,
        "last_fetched_at": f.last_fetched_at,
        "created_at": f.created_at,
    }


def article_object(
    a: Article, *, full: bool = False, versions: list[ArticleVersion] | None = None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": a.id,
        "object": "article",
        "feed_id": a.feed_id,
        "domain": a.domain,
        "title": a.title,
        "link": a.link,
        "published_at": a.published_at,
    }
    if full:
        obj["content"] = a.content
        obj["versions"] = [
            {"content": v.content, "content_hash": v.content_hash, "fetched_at": v.fetched_at}
            for v in versions or []
        ]
    return obj


def add_feed(
    session: Session, tenant_id: str, url: str, domain: str, interval_minutes: int, *, allow_private: bool
) -> Feed:
    try:
        check_url(url, allow_private=allow_private)
    except UnsafeURL as exc:
        raise InvalidField(f"feed URL refused: {exc}", param="url") from exc
    count = len(session.scalars(select(col(Feed.id)).where(col(Feed.tenant_id) == tenant_id)).all())
    if count >= MAX_FEEDS:
        raise InvalidField(f"a tenant follows at most {MAX_FEEDS} feeds", param="url")
    now = int(time.time())
    feed = Feed(
        id=new_id("feed"),
        tenant_id=tenant_id,
        url=url,
        domain=domain,
        interval_minutes=interval_minutes,
        next_fetch_at=now,
        created_at=now,
    )
    session.add(feed)
    session.flush()
    return feed


def get_feed(session: Session, tenant_id: str, feed_id: str) -> Feed:
    feed = session.get(Feed, feed_id)
    if feed is None or feed.tenant_id != tenant_id:
        raise NotFound(f"no feed {feed_id!r}", param="feed_id")
    return feed


def list_feeds(session: Session, tenant_id: str) -> list[Feed]:
    return list(session.scalars(select(Feed).where(col(Feed.tenant_id) == tenant_id).order_by(col(Feed.id))))


def remove_feed(session: Session, tenant_id: str, feed_id: str) -> None:
    feed = get_feed(session, tenant_id, feed_id)
    delete_feed_articles(session, feed.id)
    session.delete(feed)


def request_import(session: Session, tenant_id: str, feed_id: str) -> Feed:
    """Make the feed due now; the scheduler imports it on its next pass (within seconds)."""
    feed = get_feed(session, tenant_id, feed_id)
    feed.next_fetch_at = 0
    session.flush()
    return feed


def get_article(session: Session, tenant_id: str, article_id: str) -> dict[str, Any]:
    article = session.get(Article, article_id)
    if article is None or article.tenant_id != tenant_id:
        raise NotFound(f"no article {article_id!r}", param="article_id")
    versions = list(
        session.scalars(
            select(ArticleVersion)
            .where(col(ArticleVersion.article_id) == article_id)
            .order_by(col(ArticleVersion.id))
        )
    )
    return article_object(article, full=True, versions=versions)


def import_feed(
    sessions: sessionmaker[Session],
    feed_id: str,
    *,
    allow_private: bool,
    timeout_s: float = 20.0,
    max_bytes: int = 5 * 1024 * 1024,
) -> ImportCounts | None:
    """Fetch, parse and store one feed; the outcome (or the error) is recorded on the feed."""
    with sessions() as session:
        feed = session.get(Feed, feed_id)
        if feed is None:
            return None
        url, etag, last_modified = feed.url, feed.etag, feed.last_modified

    async def fetch() -> Any:
        async with make_fetch_client() as client:
            return await fetch_feed(
                client,
                url,
                etag=etag,
                last_modified=last_modified,
                allow_private=allow_private,
                timeout_s=timeout_s,
                max_bytes=max_bytes,
            )

    now = int(time.time())
    error: str | None = None
    counts: ImportCounts | None = None
    try:
        result = asyncio.run(fetch())
        with sessions.begin() as session:
            feed = session.get(Feed, feed_id)
            if feed is None:
                return None
            if result.status == "ok":
                parsed = parse_feed(result.body, base_url=result.final_url, content_type=result.content_type)
                counts = store_articles(session, feed, parsed.articles, now)
            else:
                counts = ImportCounts()
            feed.etag, feed.last_modified = result.etag, result.last_modified
            feed.last_success_at, feed.last_error, feed.consecutive_failures = now, None, 0
            feed.last_fetched_at = now
            feed.next_fetch_at = now + feed.interval_minutes * 60
    except (FetchError, ParseError, UnsafeURL) as exc:
        error = str(exc)[:500] or type(exc).__name__
    except Exception as exc:  # a bug in one import must not stop the others
        log.exception("feed %s import crashed", feed_id)
        error = f"internal error: {type(exc).__name__}"
    if error is not None:
        with sessions.begin() as session:
            feed = session.get(Feed, feed_id)
            if feed is not None:
                feed.last_error = error
                feed.consecutive_failures += 1
                feed.last_fetched_at = now
                # Back off a failing feed, up to a day, so a vanished publisher is not hammered.
                backoff = min(86400, feed.interval_minutes * 60 * 2 ** min(feed.consecutive_failures - 1, 6))
                feed.next_fetch_at = now + backoff
        log.warning("feed %s import failed: %s", feed_id, error)
    return counts


def import_due_feeds(
    sessions: sessionmaker[Session],
    *,
    allow_private: bool,
    now: int | None = None,
    timeout_s: float = 20.0,
    max_bytes: int = 5 * 1024 * 1024,
) -> int:
    now = now or int(time.time())
    with sessions() as session:
        due = list(session.scalars(select(col(Feed.id)).where(col(Feed.next_fetch_at) <= now).limit(50)))
    for feed_id in due:
        import_feed(sessions, feed_id, allow_private=allow_private, timeout_s=timeout_s, max_bytes=max_bytes)
    return len(due)
