"""The dashboard's plain pages over HTTP, without a browser: signed out they send the caller to
the sign-in form, signed in they render their own template (the browser suite skips where no
Chromium is installed, so these are the check that always runs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.settings import Settings
from tests.conftest import new_key
from tests.integration.test_access import close_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[TestClient]:
    namespace = f"{settings.queue_namespace}-pages-{uuid.uuid4().hex[:6]}"
    app = create_app(settings.model_copy(update={"queue_namespace": namespace}))
    with TestClient(app) as client:
        yield client
    close_app(app, settings.redis_url, namespace)


@pytest.mark.parametrize(("page", "table_id"), [("batches", "batch-rows"), ("models", "model-rows")])
def test_plain_page_needs_a_session_and_renders_its_template(
    api: TestClient, sessions: Any, page: str, table_id: str
) -> None:
    signed_out = api.get(f"/dashboard/{page}", follow_redirects=False)
    assert (signed_out.status_code, signed_out.headers["location"]) == (303, "/dashboard/signin")
    key, _ = new_key(sessions, f"dash-{uuid.uuid4().hex[:10]}")
    origin = {"Origin": "http://testserver"}
    signin = api.post("/dashboard/signin", data={"api_key": key}, headers=origin, follow_redirects=False)
    assert signin.status_code == 303
    try:
        shown = api.get(f"/dashboard/{page}")
        assert shown.status_code == 200
        assert f'data-page="{page}"' in shown.text and f'id="{table_id}"' in shown.text
    finally:
        api.cookies.clear()
