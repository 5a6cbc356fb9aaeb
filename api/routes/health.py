"""``/healthz`` (the process is up) and ``/readyz`` (database and Redis answer); no auth."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import StateDep
from api.responses import JSONBytes

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> JSONBytes:
    checks: dict[str, str] = {}
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready"; the type is enough to act on
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        state.broker.client.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONBytes(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )
