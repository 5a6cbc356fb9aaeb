"""The web dashboard (SPEC §12), served by the API under ``/dashboard``: pages, the JSON and
event-stream views they follow, sign-in sessions, and the static assets shipped in the package."""

from __future__ import annotations

from fastapi import APIRouter

from api.dashboard import data, pages

router = APIRouter()
router.include_router(pages.router)
router.include_router(data.router)
