"""What the simulated provider says: deterministic answers and stage 2 rankings (SPEC §4.3, §5.1).

Owns telling a review prompt from any other, the labels a review must rank, the permutation a
model "prefers" (bent, when configured, toward preferred authors or the first-shown answer),
the deliberately broken rankings (``messy``), and the token estimate. Pure functions of the
prompt and model, except ``messy`` which the caller draws from its RNG. Knows nothing about
HTTP or wire formats.
"""

from __future__ import annotations

import hashlib
import random
import re

RANKING_HEADER = "FINAL RANKING"
# A council has at most a few dozen members, so labels are one to three capitals.
_LABEL = re.compile(r"\bResponse ([A-Z]{1,3})\b")
# The stage 3 prompt carries the reviews, and with them their "FINAL RANKING:" blocks and labels;
# llm-council's (which ours follows) addresses "the Chairman", which a review prompt never does.
_RANKING_ENTRY = re.compile(r"^[ \t]*\d+[.)][ \t]*Response [A-Z]{1,3}\b.*$", re.MULTILINE)
_SYNTHESIS = re.compile(r"\bchairman\b", re.IGNORECASE)
_QUOTE_CHARS = 200


def is_review(last_user_message: str, prompt_text: str) -> bool:
    """True for a stage 2 prompt: its last user message asks for a FINAL RANKING of labelled
    responses, and nothing in the whole prompt (system included) addresses the chairman."""
    return (
        RANKING_HEADER in last_user_message
        and _LABEL.search(last_user_message) is not None
        and _SYNTHESIS.search(prompt_text) is None
    )


def review_labels(last_user_message: str) -> list[str]:
    """Every distinct ``Response X`` label in the message, in label order (A…Z, AA…).

    Lines shaped like a ranking entry (``1. Response C``) are skipped: a prompt has them only in
    its format example, which (as in llm-council's) may name a label that is not on offer when a
    reviewer sees fewer responses than the example lists.
    """
    kept = _RANKING_ENTRY.sub("", last_user_message)
    labels = set(_LABEL.findall(kept)) or set(_LABEL.findall(last_user_message))
    return sorted(labels, key=lambda label: (len(label), label))


def preferred_order(model: str, last_user_message: str, labels: list[str]) -> list[str]:
    """The model's ranking: a permutation fixed by (model, prompt), so reruns agree."""
    digest = hashlib.blake2b(f"{model}\0{last_user_message}".encode(), digest_size=8).digest()
    order = list(labels)
    random.Random(int.from_bytes(digest, "big")).shuffle(order)
    return order


# A label's heading line, then the answer under it, which the simulator signed with its author.
_AUTHOR = re.compile(r"\bResponse ([A-Z]{1,3})\b[^\n]*\n+\[simulated ([^\]\n]+)\]")


def answer_authors(last_user_message: str) -> dict[str, str]:
    """Label → the model that wrote the answer under it, for answers the simulator wrote."""
    authors: dict[str, str] = {}
    for label, model in _AUTHOR.findall(last_user_message):
        authors.setdefault(label, model)
    return authors


def _uniform(*parts: str) -> float:
    """A draw in [0, 1) fixed by ``parts``: reruns agree, and the server's RNG sequence is untouched."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def judged_order(
    model: str,
    last_user_message: str,
    labels: list[str],
    preferred: dict[str, float] | None = None,
    first_bias: float = 0.0,
) -> list[str]:
    """The ranking ``model`` gives: its ``preferred_order``, then (with probability ``p``) the
    answer of a model in ``preferred`` moved to the top (the most preferred is tried first), then
    (with probability ``first_bias``) the first-shown answer moved to the top."""
    order = preferred_order(model, last_user_message, labels)
    if preferred:
        authors = answer_authors(last_user_message)
        candidates = sorted(
            (label for label in order if authors.get(label) in preferred),
            key=lambda label: -preferred[authors[label]],
        )
        for label in candidates:
            if _uniform("prefer", model, label, last_user_message) < preferred[authors[label]]:
                order = [label, *(other for other in order if other != label)]
                break
    if first_bias > 0 and labels and _uniform("first", model, last_user_message) < first_bias:
        order = [labels[0], *(other for other in order if other != labels[0])]
    return order


def review_answer(
    model: str,
    last_user_message: str,
    messy: str | None = None,
    preferred: dict[str, float] | None = None,
    first_bias: float = 0.0,
) -> str:
    """A short evaluation ending in a ``FINAL RANKING:`` block, broken on purpose when ``messy``."""
    order = judged_order(model, last_user_message, review_labels(last_user_message), preferred, first_bias)
    lines = [f"[simulated {model}] Evaluation of {len(order)} responses."]
    for place, label in enumerate(order, start=1):
        lines.append(f"Response {label} {_VERDICTS[min(place, len(_VERDICTS)) - 1]}")
    if messy == "no_ranking":
        lines.append("\nOverall, the responses are hard to separate, so no ranking is given.")
        return "\n".join(lines)
    if messy == "duplicate":
        order = [*order[:-1], order[0]] if len(order) > 1 else [*order, *order]
    elif messy == "missing":
        order = order[:-1]
    lines.append(f"\n{RANKING_HEADER}:")
    lines.extend(f"{place}. Response {label}" for place, label in enumerate(order, start=1))
    return "\n".join(lines)


_VERDICTS = (
    "is the most accurate and complete.",
    "is accurate but less thorough.",
    "is relevant but misses some points.",
    "is the least helpful of the set.",
)


_QUESTION = re.compile(r"^Question:\n(.+?)(?:\n\n|\Z)", re.DOTALL | re.MULTILINE)


def plain_answer(model: str, last_user_message: str) -> str:
    """A stage 1 or stage 3 answer quoting the start of what was asked, so tests can match it.

    A chairman prompt is answered about the question it carries, not about its instructions."""
    question = _QUESTION.search(last_user_message) if _SYNTHESIS.search(last_user_message) else None
    if question:
        quote = question.group(1)[:_QUOTE_CHARS]
        return f"[simulated {model}] Council synthesis for: {quote}"
    quote = last_user_message[:_QUOTE_CHARS]
    # A synthesis prompt quotes reviews; the answer must still never look like a ranking.
    quote = re.sub(RANKING_HEADER, "final ranking", quote, flags=re.IGNORECASE)
    return f"[simulated {model}] Answer to: {quote}"


def estimate_tokens(text: str) -> int:
    """Deterministic token count, roughly what the real tokenizers give for English."""
    return max(1, -(-len(text) // 4))
