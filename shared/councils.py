"""What a requested council resolves to: omitted parts filled from the configured defaults and
every model checked against the catalog, for a batch's council and an experiment variant's alike."""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidField
from shared.providers.config import Catalog
from shared.schemas import CouncilIn


def resolve_council(council: CouncilIn | None, catalog: Catalog, param: str = "council") -> dict[str, Any]:
    """A council with omitted parts filled from the configured defaults: a batch's, and an
    experiment variant's (``param`` names where it was given, for the error)."""
    mode = council.mode if council else "council"
    members = list(council.members) if council and council.members else list(catalog.members)
    chairman = council.chairman if council and council.chairman else catalog.chairman
    if len(set(members)) != len(members):
        raise InvalidField("council members must be distinct", param=f"{param}.members")
    for i, model in enumerate(members):
        problem = catalog.check_model(model)
        if problem:
            raise InvalidField(problem, param=f"{param}.members[{i}]")
    problem = catalog.check_model(chairman)
    if problem:
        raise InvalidField(problem, param=f"{param}.chairman")
    return {"mode": mode, "members": members, "chairman": chairman}
