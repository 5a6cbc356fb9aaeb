"""Prompt text for the three stages: labels, knowledge context, review and chairman prompts."""

from __future__ import annotations

import pytest

from workers.council import prompts
from workers.council.stages import KnowledgeSnippet

SNIPPETS = (
    KnowledgeSnippet("k1", "Rates rise", "The bank raised rates."),
    KnowledgeSnippet("k2", "FINAL RANKING of leagues", "Table: FINAL RANKING after week 9."),
)


@pytest.mark.parametrize(
    ("index", "label"),
    [(0, "Response A"), (1, "Response B"), (25, "Response Z"), (26, "Response AA"), (701, "Response ZZ")],
)
def test_response_label(index: int, label: str) -> None:
    assert prompts.response_label(index) == label


def test_answer_messages_without_knowledge_are_the_conversation() -> None:
    messages = ({"role": "user", "content": "Why is the sky blue?"},)
    assert prompts.answer_messages(messages, ()) == messages


def test_knowledge_goes_first_as_numbered_context() -> None:
    messages = ({"role": "user", "content": "What happened to rates?"},)
    built = prompts.answer_messages(messages, SNIPPETS)
    assert [m["role"] for m in built] == ["system", "user"]
    context = built[0]["content"]
    assert "[1] Rates rise\nThe bank raised rates." in context
    assert "[2] final ranking of leagues\n" in context
    assert context.index("[1]") < context.index("[2]")
    assert built[1] == messages[0]


def test_knowledge_merges_with_an_existing_system_message() -> None:
    messages = (
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    )
    built = prompts.answer_messages(messages, SNIPPETS)
    assert [m["role"] for m in built] == ["system", "user", "assistant", "user"]
    assert built[0]["content"].startswith("Answer in French.\n\n")
    assert "[1] Rates rise" in built[0]["content"]
    assert messages[0]["content"] == "Answer in French."  # the caller's message is not mutated


def test_stage_one_text_never_contains_the_marker() -> None:
    built = prompts.answer_messages(
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}), SNIPPETS
    )
    assert all(prompts.RANKING_MARKER not in m["content"] for m in built)


def test_question_text() -> None:
    assert (
        prompts.question_text([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]) == "Q"
    )
    conversation = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert prompts.question_text(conversation) == "User: Q1\n\nAssistant: A1\n\nUser: Q2"


def test_review_prompt_asks_for_a_final_ranking_of_every_label() -> None:
    (message,) = prompts.review_messages("Why?", [("Response A", "because X"), ("Response B", "because Y")])
    content = message["content"]
    assert message["role"] == "user"
    assert "Question:\nWhy?" in content
    assert "=== Response A ===\nbecause X" in content
    assert "=== Response B ===\nbecause Y" in content
    assert "FINAL RANKING:\n1. Response <letter>" in content
    assert "Rank each of these exactly once: Response A, Response B." in content


def test_synthesis_prompt_has_answers_ranking_and_reviews() -> None:
    system = {"role": "system", "content": "Answer in French."}
    messages = prompts.synthesis_messages(
        "Why?",
        answers=[("Response A", "because X"), ("Response B", "because Y"), ("Response C", "dunno")],
        ranking=[("Response B", 1.0, 2), ("Response A", 2.0, 2), ("Response C", None, 0)],
        reviews=[("Response A", "Response B is right."), ("Response B", "")],
        system=system,
    )
    assert messages[0] == system
    content = messages[1]["content"]
    assert "=== Response C ===\ndunno" in content
    assert "- Response B: mean rank 1 over 2 review(s)\n- Response A: mean rank 2" in content
    assert "- Response C: not ranked" in content
    assert "=== Review by the author of Response A ===\nResponse B is right." in content
    assert "(no evaluation)" in content
    assert prompts.RANKING_MARKER not in content


def test_synthesis_prompt_without_reviews() -> None:
    (message,) = prompts.synthesis_messages("Why?", [("Response A", "X")], [("Response A", None, 0)], [])
    assert "No aggregate ranking is available." in message["content"]
    assert "No valid reviews were received" in message["content"]


def test_relabel_is_one_pass_and_whole_token() -> None:
    text = "Response A beats response b; Response AB is not a label."
    mapping = {"Response A": "Response B", "Response B": "Response A"}
    assert prompts.relabel(text, mapping) == "Response B beats Response A; Response AB is not a label."
