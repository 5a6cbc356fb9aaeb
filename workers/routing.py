"""``mode: "auto"`` (SPEC §5.4): a cheap, explainable complexity estimate per query.

Simple queries go to the cheapest healthy member alone, complex ones to the full council minus
the members whose circuit is open. The score adds up visible signals (length, structure,
reasoning words) so the stored reason says why, and the reason names every member skipped.

Domain rules (``[routing.domains.<name>]`` in ``providers.toml``) come first: a query that names
one of a rule's keywords is answered by that rule's members instead of the council's (the first
rule that matches, in the file's order), and the complexity estimate then chooses among them.

Health comes in as a predicate (``healthy(model)``: is the circuit of the model's provider not
open?), so routing stays pure; the worker reads the shared breakers. When every member is down a
simple query still goes to the cheapest (it waits for the circuit like any other query), and a
complex one keeps the full council unless at least two healthy members are left: a council of
one is no council, and the members' fallbacks and the circuit wait serve it better.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.providers.config import DomainRule

COMPLEX_THRESHOLD = 3
_REASONING = re.compile(
    r"\b(why|explain|compare|trade-?offs?|analy[sz]e|evaluate|design|prove|derive|diagnos\w*|"
    r"differential|pros and cons|step by step|recommend|strategy|implications?)\b",
    re.IGNORECASE,
)
_DOMAIN = re.compile(
    r"\b(patient|clinical|dosage|contraindicat\w*|legal|liabilit\w*|contract|regulat\w*|tax|"
    r"portfolio|derivative|compliance|security|vulnerabilit\w*)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Route:
    mode: str  # "council" or "single"
    members: tuple[str, ...]
    score: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "members": list(self.members), "score": self.score, "reason": self.reason}


def complexity(text: str, turns: int) -> tuple[int, list[str]]:
    score, why = 0, list[str]()
    words = len(text.split())
    if words > 150:
        score, why = score + 2, [*why, f"{words} words"]
    elif words > 40:
        score, why = score + 1, [*why, f"{words} words"]
    if turns > 2:
        score, why = score + 1, [*why, f"{turns} turns"]
    if text.count("?") > 1:
        score, why = score + 1, [*why, "several questions"]
    if re.search(r"^\s*(\d+\.|[-*])\s", text, re.MULTILINE) or "```" in text:
        score, why = score + 1, [*why, "structured input"]
    reasoning = {m.lower() for m in _REASONING.findall(text)}
    if reasoning:
        score, why = (
            score + min(2, len(reasoning)),
            [*why, "asks for reasoning (" + ", ".join(sorted(reasoning)[:3]) + ")"],
        )
    domain = {m.lower() for m in _DOMAIN.findall(text)}
    if domain:
        score, why = score + 1, [*why, "high-stakes domain (" + ", ".join(sorted(domain)[:3]) + ")"]
    return score, why


@functools.lru_cache(maxsize=256)
def _keywords(keywords: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)


def match_domain(text: str, domains: Sequence[DomainRule]) -> tuple[DomainRule, list[str]] | None:
    """The first domain rule a keyword of which the text names, with the keywords it named."""
    for rule in domains:
        found = sorted({m.lower() for m in _keywords(rule.keywords).findall(text)})
        if found:
            return rule, found
    return None


def route(
    messages: Sequence[dict[str, str]],
    members: Sequence[str],
    price: Callable[[str], float],
    healthy: Callable[[str], bool] = lambda model: True,
    domains: Sequence[DomainRule] = (),
) -> Route:
    text = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    matched = match_domain(text, domains) if domains else None
    if matched is None:
        return _route(text, len(messages), members, price, healthy)
    rule, found = matched
    decision = _route(text, len(messages), rule.members, price, healthy)
    why = f"domain {rule.name} (names {', '.join(found[:3])}): its members {', '.join(rule.members)}"
    return Route(decision.mode, decision.members, decision.score, f"{why}; {decision.reason}")


def _route(
    text: str,
    turns: int,
    members: Sequence[str],
    price: Callable[[str], float],
    healthy: Callable[[str], bool],
) -> Route:
    score, why = complexity(text, turns)
    if len(members) == 1:
        signals = f" (signals: {'; '.join(why)})" if why else ""
        return Route("council", tuple(members), score, f"single member{signals}")
    up = [m for m in members if healthy(m)]
    down = ", ".join(m for m in members if m not in up)
    if score >= COMPLEX_THRESHOLD:
        reason = "complex: " + "; ".join(why)
        if not down:
            return Route("council", tuple(members), score, reason)
        if len(up) < 2:
            return Route(
                "council",
                tuple(members),
                score,
                f"{reason}; circuit open for {down}: too few healthy members to leave out",
            )
        return Route("council", tuple(up), score, f"{reason}; skipped (circuit open): {down}")
    detail = "; ".join(why) if why else "short, plain question"
    reason = f"simple (score {score} < {COMPLEX_THRESHOLD}: {detail})"
    if not up:
        cheapest = _cheapest(members, members, price)
        return Route(
            "single",
            (cheapest,),
            score,
            f"{reason}; every member's circuit is open, cheapest member {cheapest}",
        )
    cheapest = _cheapest(up, members, price)
    if down:
        return Route(
            "single",
            (cheapest,),
            score,
            f"{reason}; cheapest healthy member {cheapest} (circuit open: {down})",
        )
    return Route("single", (cheapest,), score, f"{reason}; cheapest member {cheapest}")


def _cheapest(candidates: Sequence[str], members: Sequence[str], price: Callable[[str], float]) -> str:
    # Price ties keep member order.
    return min(candidates, key=lambda m: (price(m), members.index(m)))
