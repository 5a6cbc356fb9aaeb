"""The Alembic migrations build exactly the schema the models describe (autogenerate finds no
difference), on SQLite and on PostgreSQL, and downgrade cleanly."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

import shared.models  # noqa: F401  (registers the tables)
from shared.db import alembic_config

pytestmark = pytest.mark.integration

# Full-text search objects are hand-written in the migration; the models do not describe them.
SEARCH_OBJECTS = ("articles_fts", "ix_articles_fts")


def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not (name and name.startswith(SEARCH_OBJECTS))


def test_models_and_migrations_agree(private_database_url: str) -> None:
    engine = create_engine(private_database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": include, "compare_type": True})
            diff = compare_metadata(context, SQLModel.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(private_database_url: str) -> None:
    from alembic import command

    cfg = alembic_config(private_database_url)
    command.downgrade(cfg, "base")
    engine = create_engine(private_database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    command.upgrade(cfg, "head")
    engine = create_engine(private_database_url)
    try:
        assert {"batches", "queries", "provider_calls", "articles"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
