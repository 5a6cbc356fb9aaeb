"""``/v1/experiments`` (SPEC §13): A/B experiments over councils (``shared.analytics.experiments``).

Writers create and patch (a rollout step), viewers read; an experiment is its tenant's (another
tenant's id is 404). ``GET /v1/experiments/{id}`` is the report: per variant ``n``, mean, 95%
interval, p-value, and the ``winner`` once significant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, SessionDep, StateDep, WriterDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.analytics.experiments import (
    ExperimentCreate,
    ExperimentPatch,
    create_experiment,
    experiment_object,
    get_experiment,
    list_experiments,
    patch_weights,
    report,
)
from shared.db import write_transaction

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])


@router.post("", status_code=201, responses=ERROR_RESPONSES)
def create(body: ExperimentCreate, state: StateDep, principal: WriterDep) -> JSONBytes:
    created = create_experiment(state.sessions, principal.tenant_id, body, state.catalog)
    return JSONBytes(created, status_code=201)


@router.get("", responses=ERROR_RESPONSES)
def list_(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONBytes:
    rows, more = list_experiments(session, principal.tenant_id, limit, after)
    return list_page([experiment_object(r) for r in rows], more)


@router.get("/{experiment_id}", responses=ERROR_RESPONSES)
def get(experiment_id: str, session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    return JSONBytes(report(session, get_experiment(session, principal.tenant_id, experiment_id)))


@router.patch("/{experiment_id}", responses=ERROR_RESPONSES)
def patch(experiment_id: str, body: ExperimentPatch, state: StateDep, principal: WriterDep) -> JSONBytes:
    with write_transaction(state.sessions) as session:
        row = patch_weights(session, principal.tenant_id, experiment_id, body)
        return JSONBytes(report(session, row))
