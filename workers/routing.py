"""``mode: "auto"`` (SPEC §5.4): a cheap, explainable complexity estimate per query.

Simple queries go to the cheapest member alone, complex ones to the full council. The score
adds up visible signals (length, structure, reasoning words) so the stored reason says why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


def route(messages: Sequence[dict[str, str]], members: Sequence[str], price: Callable[[str], float]) -> Route:
    text = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    score, why = complexity(text, len(messages))
    if len(members) == 1:
        signals = f" (signals: {'; '.join(why)})" if why else ""
        return Route("council", tuple(members), score, f"single member{signals}")
    if score >= COMPLEX_THRESHOLD:
        return Route("council", tuple(members), score, "complex: " + "; ".join(why))
    cheapest = min(members, key=lambda m: (price(m), members.index(m)))
    detail = "; ".join(why) if why else "short, plain question"
    return Route(
        "single",
        (cheapest,),
        score,
        f"simple (score {score} < {COMPLEX_THRESHOLD}: {detail}); cheapest member {cheapest}",
    )
