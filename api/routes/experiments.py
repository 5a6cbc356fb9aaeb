"""``/v1/experiments`` (SPEC §13): A/B experiments over councils (``shared.analytics.experiments``)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])
