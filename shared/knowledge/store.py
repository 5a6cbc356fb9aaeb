"""Storing imported articles: de-duplication, versions, and the search index kept in step.

An article is identified within its feed by its guid (the parser falls back to the link, then a
hash). An unchanged article is left alone; a changed one gets a new version (its previous
contents stay in ``article_versions``) rather than a new article; an article whose content
already exists in the feed under another guid (a re-post) is skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.ids import new_id
from shared.knowledge.parse import ParsedArticle
from shared.models import Article, ArticleVersion, Feed


@dataclass(frozen=True)
class ImportCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0


def store_articles(
    session: Session, feed: Feed, articles: list[ParsedArticle], now: int | None = None
) -> ImportCounts:
    """Upsert ``articles`` of ``feed``. Caller commits."""
    now = now or int(time.time())
    guids = [a.guid for a in articles]
    existing = {
        a.guid: a
        for a in session.scalars(
            select(Article).where(col(Article.feed_id) == feed.id, col(Article.guid).in_(guids))
        )
    }
    known_hashes = set(
        session.scalars(
            select(col(Article.content_hash)).where(
                col(Article.feed_id) == feed.id,
                col(Article.content_hash).in_([a.content_hash for a in articles]),
            )
        )
    )
    created = updated = unchanged = duplicates = 0
    for parsed in articles:
        current = existing.get(parsed.guid)
        if current is None:
            if parsed.content_hash in known_hashes:
                duplicates += 1
                continue
            article = Article(
                id=new_id("art"),
                feed_id=feed.id,
                tenant_id=feed.tenant_id,
                domain=feed.domain,
                guid=parsed.guid,
                title=parsed.title,
                link=parsed.link,
                published_at=parsed.published_at,
                content=parsed.content,
                content_hash=parsed.content_hash,
                created_at=now,
                updated_at=now,
            )
            session.add(article)
            session.flush()
            _add_version(session, article.id, parsed, now)
            _index(session, article)
            known_hashes.add(parsed.content_hash)
            existing[parsed.guid] = article
            created += 1
        elif current.content_hash != parsed.content_hash or current.title != parsed.title:
            current.title = parsed.title
            current.link = parsed.link or current.link
            current.published_at = parsed.published_at or current.published_at
            if current.content_hash != parsed.content_hash:
                current.content = parsed.content
                current.content_hash = parsed.content_hash
                _add_version(session, current.id, parsed, now)
                known_hashes.add(parsed.content_hash)
            current.updated_at = now
            session.flush()
            _index(session, current)
            updated += 1
        else:
            unchanged += 1
    return ImportCounts(created, updated, unchanged, duplicates)


def _add_version(session: Session, article_id: str, parsed: ParsedArticle, now: int) -> None:
    session.execute(
        insert(ArticleVersion.__table__),  # type: ignore[attr-defined]
        [
            {
                "article_id": article_id,
                "content": parsed.content,
                "content_hash": parsed.content_hash,
                "fetched_at": now,
            }
        ],
    )


def _index(session: Session, article: Article) -> None:
    """Keep SQLite's FTS5 table in step (PostgreSQL indexes the articles table itself)."""
    if session.get_bind().dialect.name != "sqlite":
        return
    session.execute(text("DELETE FROM articles_fts WHERE article_id = :id"), {"id": article.id})
    session.execute(
        text(
            "INSERT INTO articles_fts (title, content, article_id, tenant_id, domain) "
            "VALUES (:title, :content, :id, :tenant, :domain)"
        ),
        {
            "title": article.title,
            "content": article.content,
            "id": article.id,
            "tenant": article.tenant_id,
            "domain": article.domain,
        },
    )


def delete_feed_articles(session: Session, feed_id: str) -> None:
    ids = list(session.scalars(select(col(Article.id)).where(col(Article.feed_id) == feed_id)))
    if not ids:
        return
    if session.get_bind().dialect.name == "sqlite":
        for article_id in ids:
            session.execute(text("DELETE FROM articles_fts WHERE article_id = :id"), {"id": article_id})
    session.execute(delete(ArticleVersion).where(col(ArticleVersion.article_id).in_(ids)))
    session.execute(delete(Article).where(col(Article.feed_id) == feed_id))
