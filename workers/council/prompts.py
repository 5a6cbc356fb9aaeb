"""Every word the council says to a model, for its three stages (SPEC §5.1).

Owns the stage 1 messages (the user's conversation, plus numbered knowledge context), the
stage 2 review prompt and the stage 3 chairman prompt, and the ``Response A`` labels. It does
not choose who sees what (``stages.py``) nor read the answers (``ranking.py``).

Stage 1 text built here never contains ``FINAL RANKING``: that marker is what makes a prompt a
review, for the parser and for the simulated provider alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

RANKING_MARKER = "FINAL RANKING"
_LABEL_TOKEN = re.compile(r"\bresponse\s+[a-z]+\b", re.IGNORECASE)


class Snippet(Protocol):
    @property
    def title(self) -> str: ...

    @property
    def content(self) -> str: ...


def response_label(index: int) -> str:
    """``0 -> "Response A"``, ``25 -> "Response Z"``, ``26 -> "Response AA"``."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return f"Response {letters}"


def answer_messages(messages: Sequence[Message], knowledge: Sequence[Snippet]) -> tuple[Message, ...]:
    """Stage 1: the conversation as given, with knowledge as numbered context in its system message."""
    if not knowledge:
        return tuple(messages)
    context = knowledge_context(knowledge)
    if messages and messages[0]["role"] == "system":
        # One system message, not two: some providers accept only one, and the user's comes first.
        merged = {"role": "system", "content": f"{messages[0]['content']}\n\n{context}"}
        return (merged, *messages[1:])
    return ({"role": "system", "content": context}, *messages)


def knowledge_context(knowledge: Sequence[Snippet]) -> str:
    snippets = "\n\n".join(
        f"[{number}] {_defuse(s.title)}\n{_defuse(s.content)}" for number, s in enumerate(knowledge, start=1)
    )
    return (
        "Background knowledge that may help with the question. Use it where it is relevant, "
        "cite it by number like [1], and do not assume it covers everything.\n\n" + snippets
    )


def question_text(messages: Sequence[Message]) -> str:
    """The question as reviewers and the chairman see it: the conversation without system text."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def review_messages(question: str, answers: Sequence[tuple[str, str]]) -> tuple[Message, ...]:
    """Stage 2: rank the labelled ``(label, answer)`` pairs, ending with the FINAL RANKING list."""
    labels = ", ".join(label for label, _ in answers)
    prompt = (
        "You are reviewing answers that other assistants gave to a question. The answers are "
        "anonymous and in no particular order.\n\n"
        f"Question:\n{question}\n\n"
        f"{_blocks(answers)}\n\n"
        "Evaluate each response in turn: what it gets right, what it gets wrong or leaves out, "
        "and how clear it is. Judge accuracy and usefulness to the person asking, not length.\n\n"
        f'Then end your reply with the line "{RANKING_MARKER}:" followed by the responses from best '
        "to worst as a numbered list, one per line, each line holding only the label:\n\n"
        f"{RANKING_MARKER}:\n1. Response <letter>\n2. Response <letter>\n\n"
        f"Rank each of these exactly once: {labels}. Write nothing after the list."
    )
    return ({"role": "user", "content": prompt},)


def synthesis_messages(
    question: str,
    answers: Sequence[tuple[str, str]],
    ranking: Sequence[tuple[str, float | None, int]],
    reviews: Sequence[tuple[str, str]],
    system: Message | None = None,
) -> tuple[Message, ...]:
    """Stage 3: the chairman's prompt.

    ``answers`` are ``(label, answer)``, ``ranking`` is ``(label, mean_rank, votes)`` best first,
    ``reviews`` are ``(label of the reviewer's own answer, evaluation)``. ``system`` is the stage 1
    system message, so the final answer follows the same instructions and citation numbers.
    """
    if ranking and any(votes for _, _, votes in ranking):
        ranked = "\n".join(
            f"- {label}: mean rank {mean:g} over {votes} review(s)"
            if mean is not None
            else f"- {label}: not ranked"
            for label, mean, votes in ranking
        )
        ranking_text = f"Aggregate ranking by the reviewers (mean rank, 1 = best):\n{ranked}"
    else:
        ranking_text = "No aggregate ranking is available."
    if reviews:
        blocks = [(f"Review by the author of {label}", text or "(no evaluation)") for label, text in reviews]
        reviews_text = "Reviews (no reviewer saw or ranked its own answer):\n\n" + _blocks(blocks)
    else:
        reviews_text = "No valid reviews were received; judge the answers yourself."
    prompt = (
        "You are the chairman of a council of AI assistants. Each assistant answered the question "
        "below independently, then reviewed the others' answers anonymously. Write the single best "
        "final answer to the question: build on the strongest answers, correct their mistakes in the "
        "light of the reviews, and weigh the ranking. Reply with the final answer only, addressed to "
        "the person who asked; do not mention the council, the reviews or the response labels.\n\n"
        f"Question:\n{question}\n\n"
        f"Answers:\n\n{_blocks(answers)}\n\n"
        f"{ranking_text}\n\n"
        f"{reviews_text}"
    )
    user: Message = {"role": "user", "content": prompt}
    return (system, user) if system else (user,)


def relabel(text: str, mapping: Mapping[str, str]) -> str:
    """Rewrite ``Response X`` tokens through ``mapping`` (label -> label) in one pass.

    Each reviewer saw its own shuffled labels; the chairman sees one fixed labelling, so a
    review must be translated before the chairman can read it.
    """
    by_key = {" ".join(old.split()).casefold(): new for old, new in mapping.items()}

    def replace(match: re.Match[str]) -> str:
        return by_key.get(" ".join(match[0].split()).casefold(), match[0])

    return _LABEL_TOKEN.sub(replace, text)


def _blocks(items: Sequence[tuple[str, str]]) -> str:
    return "\n\n".join(f"=== {heading} ===\n{text}" for heading, text in items)


def _defuse(text: str) -> str:
    # Knowledge comes from third-party feeds; keep the stage 1 invariant even if one shouts the marker.
    return text.replace(RANKING_MARKER, RANKING_MARKER.lower())
