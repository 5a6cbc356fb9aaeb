"""Ranked full-text search over a tenant's articles: SQLite FTS5 (bm25) or PostgreSQL tsvector
(ts_rank), behind one function.

A question is turned into its distinctive words joined with OR, so an article that shares the
rare words of a question ranks first even when it lacks the common ones.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

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


def search_articles(
    session: Session, tenant_id: str, question: str, *, domain: str | None = None, limit: int = 10
) -> list[dict[str, Any]]:
    """Articles best matching ``question``, best first: ``{id, feed_id, domain, title, link,
    published_at, content, score}``."""
    words = terms(question)
    if not words:
        return []
    if session.get_bind().dialect.name == "sqlite":
        match = " OR ".join(f'"{w}"' for w in words)
        rows = session.execute(
            text(
                "SELECT a.id, a.feed_id, a.domain, a.title, a.link, a.published_at, a.content, "
                "bm25(articles_fts, 2.0, 1.0) AS score "
                "FROM articles_fts JOIN articles a ON a.id = articles_fts.article_id "
                "WHERE articles_fts MATCH :match AND articles_fts.tenant_id = :tenant "
                "AND (:domain IS NULL OR articles_fts.domain = :domain) "
                "ORDER BY score LIMIT :limit"
            ),
            {"match": match, "tenant": tenant_id, "domain": domain, "limit": limit},
        ).all()
    else:
        query = " | ".join(words)
        rows = session.execute(
            text(
                "SELECT id, feed_id, domain, title, link, published_at, content, "
                f"ts_rank({_DOC}, q) AS score "
                "FROM articles, to_tsquery('english', :query) q "
                "WHERE tenant_id = :tenant AND (CAST(:domain AS text) IS NULL OR domain = :domain) "
                f"AND {_DOC} @@ q "
                "ORDER BY score DESC LIMIT :limit"
            ),
            {"query": query, "tenant": tenant_id, "domain": domain, "limit": limit},
        ).all()
    return [dict(r._mapping) for r in rows]
