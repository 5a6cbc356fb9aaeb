"""``/v1/knowledge``: feeds (admin) and articles with ranked full-text search (SPEC §8)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, PrincipalDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.knowledge import feeds, search
from shared.knowledge.search import search_articles

router = APIRouter(prefix="/v1/knowledge", tags=["knowledge"])


class FeedIn(BaseModel):
    url: str = Field(max_length=2048, pattern=r"^https?://[^/?#\s]+")
    domain: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    interval_minutes: int = Field(default=60, ge=5, le=7 * 24 * 60)


@router.post("/feeds", status_code=201, responses=ERROR_RESPONSES)
def add_feed(body: FeedIn, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        feed = feeds.add_feed(
            session,
            principal.tenant_id,
            body.url,
            body.domain,
            body.interval_minutes,
            allow_private=state.settings.webhook_allow_private,
        )
        return JSONBytes(feeds.feed_object(feed), status_code=201)


@router.get("/feeds", responses=ERROR_RESPONSES)
def list_feeds(session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    return list_page([feeds.feed_object(f) for f in feeds.list_feeds(session, principal.tenant_id)])


@router.post("/feeds/{feed_id}/import", status_code=202, responses=ERROR_RESPONSES)
def import_now(feed_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        return JSONBytes(
            feeds.feed_object(feeds.request_import(session, principal.tenant_id, feed_id)), status_code=202
        )


@router.delete("/feeds/{feed_id}", responses=ERROR_RESPONSES)
def delete_feed(feed_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        feeds.remove_feed(session, principal.tenant_id, feed_id)
    return JSONBytes({"id": feed_id, "object": "feed", "deleted": True})


@router.get("/articles", responses=ERROR_RESPONSES)
def list_articles(
    session: SessionDep,
    principal: PrincipalDep,
    q: Annotated[str | None, Query(max_length=500)] = None,
    domain: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONBytes:
    if q:
        found = search_articles(session, principal.tenant_id, q, domain=domain, limit=limit + 1, after=after)
        rows = [{k: v for k, v in r.items() if k != "content"} | {"object": "article"} for r in found]
        return list_page(rows[:limit], len(rows) > limit)
    articles, has_more = search.list_articles(
        session, principal.tenant_id, domain=domain, limit=limit, after=after
    )
    return list_page([feeds.article_object(a) for a in articles], has_more)


@router.get("/articles/{article_id}", responses=ERROR_RESPONSES)
def get_article(article_id: str, session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    return JSONBytes(feeds.get_article(session, principal.tenant_id, article_id))
