"""Grounding (SPEC §8): the top-k articles matching a query, as numbered context for stage 1."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.knowledge.search import search_articles

# Enough of each article to ground an answer without crowding out the question.
SNIPPET_CHARS = 2_000


def question_text(messages: list[dict[str, str]]) -> str:
    """What to search for: the user turns, latest first (it carries the actual question)."""
    return "\n".join(m["content"] for m in reversed(messages) if m["role"] == "user")


def ground(
    session: Session, tenant_id: str, messages: list[dict[str, str]], knowledge: dict[str, Any]
) -> list[dict[str, str]]:
    """``[{id, title, content}]`` best first, at most ``knowledge["top_k"]``."""
    found = search_articles(
        session,
        tenant_id,
        question_text(messages),
        domain=knowledge.get("domain"),
        limit=int(knowledge.get("top_k", 3)),
    )
    return [{"id": a["id"], "title": a["title"], "content": a["content"][:SNIPPET_CHARS]} for a in found]
