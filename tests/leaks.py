"""The secrets-in-logs check (README, "Observability"): no key or secret the suite creates is ever logged.

Two kinds of needle:

- ``CREATED_SECRETS``: every API key and webhook secret the suite's fixtures issue, every key the
  CLI prints to a test, and every provider key a test configures (``remember_secret`` adds one);
- anything shaped like a Conclave API key (``cnk_`` + 43) or webhook secret (``whsec_`` + 44),
  registered or not, since keys created inside a process (``POST /v1/keys``, a secret rotation)
  never pass through the test's hands unless it reads the response.

Two kinds of haystack:

- every ``*.log`` file under the session's pytest base directory: ``shared.stack.Stack`` writes
  each process's stdout and stderr to ``<logs>/<name>.log`` and every fixture and test gives it a
  ``logs`` directory under ``tmp_path``; the scheduler-replica test writes its own ``.log`` there too;
- what pytest captured from each test (stdout, stderr, log records), which is where the JSON log
  lines of in-process apps (``create_app`` under ``TestClient``) and of in-process providers go.

A finding names the file (or the test and capture) and the line, and shows only a secret's first
characters: the report of a leak must not be a leak.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CREATED_SECRETS: set[str] = set()

# Shapes of shared.tenants' keys and secrets: cnk_ + token_urlsafe(32), whsec_ + b64encode(32 bytes).
SECRET_SHAPES = re.compile(r"(?<![\w-])(?:cnk_[\w-]{43}|whsec_[A-Za-z0-9+/]{43}=)(?![\w-])")


def remember_secret(*secrets: str) -> str:
    """Add secrets the suite created or configured to the set searched for; returns the first."""
    CREATED_SECRETS.update(s for s in secrets if s)
    return secrets[0]


def shown(secret: str) -> str:
    """Enough of a secret to recognise it, never enough to use it."""
    return secret[: min(8, len(secret) // 3)] + "…"


@dataclass(frozen=True)
class Leak:
    where: str  # a file path, or "<test id> (captured stderr call)"
    line: int
    secret: str
    registered: bool

    def __str__(self) -> str:
        what = "created secret" if self.registered else "unregistered key-shaped secret"
        return f"{self.where}:{self.line}: {what} {shown(self.secret)}"


def find_leaks(where: str, lines: Iterable[str], secrets: set[str]) -> Iterator[Leak]:
    """Each line holding one of ``secrets`` or anything shaped like a key or webhook secret."""
    # Key-shaped secrets are found by their pattern and looked up; only the others (provider
    # keys, a few) are searched for one by one.
    others = [s for s in secrets if not SECRET_SHAPES.fullmatch(s)]
    for number, line in enumerate(lines, start=1):
        for match in SECRET_SHAPES.finditer(line):
            yield Leak(where, number, match.group(), match.group() in secrets)
        for secret in others:
            if secret in line:
                yield Leak(where, number, secret, True)


def leaks_in_files(root: Path, secrets: set[str]) -> list[Leak]:
    found: list[Leak] = []
    for path in sorted(root.rglob("*.log")):
        if path.is_file():
            with path.open(encoding="utf-8", errors="replace") as lines:
                found.extend(find_leaks(str(path), lines, secrets))
    return found


def report(leaks: list[Leak], limit: int = 50) -> str:
    lines = [f"{len(leaks)} log line(s) hold a key or secret the suite created:"]
    lines += [f"  {leak}" for leak in leaks[:limit]]
    if len(leaks) > limit:
        lines.append(f"  … and {len(leaks) - limit} more")
    return "\n".join(lines)
