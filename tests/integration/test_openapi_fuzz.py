"""schemathesis against the running API's /openapi.json, every check but one, bounded and seeded.

``positive_data_acceptance`` is left out: it expects every schema-valid request to be accepted,
and some rules cannot be written in JSON Schema (exactly one of ``prompt``/``messages``, a
webhook host that must resolve to a public address, a real calendar date).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.stack import Stack
from shared.tenants import issue_key

pytestmark = pytest.mark.integration

EXAMPLES = 25


def test_schemathesis_finds_no_server_error_and_no_schema_violation(stack: Stack, sessions: Any) -> None:
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with sessions.begin() as session:
        key = issue_key(
            session, tenant_name="fuzz-operator", role="admin", tier="enterprise", operator=True
        ).api_key

    def fuzz() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                binary,
                "run",
                f"{stack.api_url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--header",
                f"Authorization: Bearer {key}",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                "1",
                # One worker: with two, schemathesis itself failed now and then inside CPython 3.11's
                # parser ("SystemError: AST constructor recursion depth mismatch"), not in our API.
                "--workers",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )

    result = fuzz()
    # A crash inside schemathesis itself (CPython 3.11's parser, seen in CI) says nothing about
    # the API: run once more. Any failure it reports about the API fails the test.
    if result.returncode != 0 and "SystemError: AST constructor recursion depth mismatch" in result.stdout:
        result = fuzz()
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    print(result.stdout.strip().splitlines()[-1])
