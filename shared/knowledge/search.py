"""Reading a tenant's articles: a page of the newest, or ranked full-text search (SQLite FTS5
bm25 or PostgreSQL tsvector ts_rank, behind one function); both page with an ``after`` cursor.

A question is turned into its distinctive words joined with OR, so an article that shares the
rare words of a question ranks first even when it lacks the common ones.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.models import Article

_WORD = re.compile(r"[^\W_]{2,}", re.UNICODE)
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "should",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "about",
        "into",
        "over",
        "more",
        "most",
        "some",
        "such",
        "only",
        "also",
        "not",
        "no",
    ]
)
MAX_TERMS = 24
# The same expression as the migration's GIN index, so PostgreSQL uses it.
_DOC = "to_tsvector('english', coalesce(title, '') || ' ' || coalesce(content, ''))"


def terms(question: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD.findall(question.lower()):
        if word not in _STOP:
            seen.setdefault(word, None)
    return list(seen)[:MAX_TERMS]


def list_articles(
    session: Session, tenant_id: str, *, domain: str | None, limit: int, after: str | None
) -> tuple[list[Article], bool]:
    """One page of a tenant's articles, newest published first (undated ones last, ties by id),
    and whether more follow. ``after`` is the last id of the previous page; an id that is not
    one of the tenant's articles ends the list."""
    published = func.coalesce(col(Article.published_at), -1)
    stmt = select(Article).where(col(Article.tenant_id) == tenant_id)
    if domain:
        stmt = stmt.where(col(Article.domain) == domain)
    if after:
        anchor = session.scalar(
            select(published).where(col(Article.id) == after, col(Article.tenant_id) == tenant_id)
        )
        if anchor is None:
            return [], False
        stmt = stmt.where(or_(published < anchor, and_(published == anchor, col(Article.id) > after)))
    rows = list(session.scalars(stmt.order_by(published.desc(), col(Article.id)).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def search_articles(
    session: Session,
    tenant_id: str,
    question: str,
    *,
    domain: str | None = None,
    limit: int = 10,
    after: str | None = None,
) -> list[dict[str, Any]]:
    """Articles best matching ``question``, best first (ties by id): ``{id, feed_id, domain, title,
    link, published_at, content, score}``. With ``after``, those ranked below that article; none
    when it is not among the matches."""
    words = terms(question)
    if not words:
        return []
    # The cursor is the article itself: its score is computed by the same query, so the page
    # after it starts exactly where the previous one ended, whatever the scores are.
    if session.get_bind().dialect.name == "sqlite":
        match = " OR ".join(f'"{w}"' for w in words)
        rows = session.execute(
            text(
                "WITH ranked AS ("
                "SELECT a.id, a.feed_id, a.domain, a.title, a.link, a.published_at, a.content, "
                "bm25(articles_fts, 2.0, 1.0) AS score "
                "FROM articles_fts JOIN articles a ON a.id = articles_fts.article_id "
                "WHERE articles_fts MATCH :match AND articles_fts.tenant_id = :tenant "
                "AND (:domain IS NULL OR articles_fts.domain = :domain)) "
                "SELECT * FROM ranked WHERE :after IS NULL OR EXISTS (SELECT 1 FROM ranked c "
                "WHERE c.id = :after "
                "AND (ranked.score > c.score OR (ranked.score = c.score AND ranked.id > c.id))) "
                "ORDER BY score, id LIMIT :limit"
            ),
            {"match": match, "tenant": tenant_id, "domain": domain, "limit": limit, "after": after},
        ).all()
    else:
        query = " | ".join(words)
        rows = session.execute(
            text(
                "WITH ranked AS ("
                "SELECT id, feed_id, domain, title, link, published_at, content, "
                f"ts_rank({_DOC}, q) AS score "
                "FROM articles, to_tsquery('english', :query) q "
                "WHERE tenant_id = :tenant AND (CAST(:domain AS text) IS NULL OR domain = :domain) "
                f"AND {_DOC} @@ q) "
                "SELECT * FROM ranked WHERE CAST(:after AS text) IS NULL OR EXISTS (SELECT 1 FROM ranked c "
                "WHERE c.id = :after "
                "AND (ranked.score < c.score OR (ranked.score = c.score AND ranked.id > c.id))) "
                "ORDER BY score DESC, id LIMIT :limit"
            ),
            {"query": query, "tenant": tenant_id, "domain": domain, "limit": limit, "after": after},
        ).all()
    return [dict(r._mapping) for r in rows]
