"""``mode: "auto"`` routing (SPEC §5.4): simple → cheapest member alone, complex → the full council,
with a stored reason that says why."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.providers.config import DomainRule
from workers.routing import COMPLEX_THRESHOLD, Route, complexity, route

MEMBERS = ("openai:gpt-4o", "anthropic:claude-3-5-haiku-latest", "google:gemini-2.0-flash")
PRICES = {
    "openai:gpt-4o": 12.5,
    "anthropic:claude-3-5-haiku-latest": 4.8,
    "google:gemini-2.0-flash": 0.5,
}


def price(model: str) -> float:
    return PRICES[model]


def ask(text: str, members: tuple[str, ...] = MEMBERS) -> Route:
    return route([{"role": "user", "content": text}], members, price)


# -- simple -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "What is the capital of France?",
        "Translate 'good morning' into Spanish.",
        "How many legs does a spider have?",
        "What year did the Berlin Wall fall?",
    ],
)
def test_simple_question_goes_to_the_cheapest_member_alone(question: str) -> None:
    decision = ask(question)

    assert decision.mode == "single"
    assert decision.members == ("google:gemini-2.0-flash",)
    assert decision.score < COMPLEX_THRESHOLD


def test_simple_reason_names_score_and_cheapest_member() -> None:
    decision = ask("What is the capital of France?")

    assert decision.score == 0
    assert decision.reason.startswith("simple")
    assert f"score 0 < {COMPLEX_THRESHOLD}" in decision.reason
    assert "short, plain question" in decision.reason
    assert "cheapest member google:gemini-2.0-flash" in decision.reason


def test_simple_reason_lists_the_signals_below_threshold() -> None:
    decision = ask("What is the current corporate tax rate in Ireland?")

    assert decision.mode == "single"
    assert decision.score == 1
    assert "high-stakes domain (tax)" in decision.reason


def test_price_ties_keep_member_order() -> None:
    decision = route([{"role": "user", "content": "Hi there"}], MEMBERS, lambda m: 1.0)

    assert decision.members == ("openai:gpt-4o",)


def test_unpriced_members_are_cheapest() -> None:
    prices = {**PRICES, "anthropic:claude-3-5-haiku-latest": 0.0}

    decision = route([{"role": "user", "content": "Hi"}], MEMBERS, prices.__getitem__)

    assert decision.members == ("anthropic:claude-3-5-haiku-latest",)


# -- complex ------------------------------------------------------------------------------------


def test_long_question_with_reasoning_goes_to_the_council() -> None:
    text = "Explain the history of the printing press in Europe. " + "It spread quickly. " * 60

    decision = ask(text)

    assert decision.mode == "council"
    assert decision.members == MEMBERS
    assert decision.score >= COMPLEX_THRESHOLD
    assert decision.reason.startswith("complex: ")
    assert "words" in decision.reason
    assert "asks for reasoning (explain)" in decision.reason


def test_several_reasoning_words_and_a_domain_go_to_the_council() -> None:
    decision = ask("Why does the contract's liability clause matter? Compare it with the usual one.")

    assert decision.mode == "council"
    assert "several questions" not in decision.reason  # only one question mark
    assert "asks for reasoning (compare, why)" in decision.reason
    assert "high-stakes domain (contract, liability)" in decision.reason


def test_multi_question_structured_input_goes_to_the_council() -> None:
    text = (
        "Compare the options for my setup:\n"
        "1. Which database should I pick?\n"
        "2. How many replicas do I need?\n"
        "3. What about backups?"
    )

    decision = ask(text)

    assert decision.mode == "council"
    assert decision.score == 3
    assert "several questions" in decision.reason
    assert "structured input" in decision.reason
    assert "asks for reasoning (compare)" in decision.reason


def test_medical_question_asking_for_a_differential_goes_to_the_council() -> None:
    decision = ask("Patient, 54, chest pain on exertion: what is the differential diagnosis, and why?")

    assert decision.mode == "council"
    assert "high-stakes domain (patient)" in decision.reason
    assert "asks for reasoning" in decision.reason


def test_long_conversation_counts_turns() -> None:
    messages = [
        {"role": "user", "content": "Recommend a strategy for learning chess."},
        {"role": "assistant", "content": "Start with tactics puzzles. " * 100},
        {"role": "user", "content": "And after that?"},
    ]

    decision = route(messages, MEMBERS, price)

    assert decision.mode == "council"
    assert "3 turns" in decision.reason
    # The assistant's own words do not make the user's question longer.
    assert "words" not in decision.reason


def test_threshold_is_inclusive() -> None:
    score, why = complexity("Explain why the sky is blue? And why sunsets are red?", 1)

    assert score == COMPLEX_THRESHOLD
    assert ask("Explain why the sky is blue? And why sunsets are red?").mode == "council"
    assert why == ["several questions", "asks for reasoning (explain, why)"]


def test_reasoning_words_count_at_most_two() -> None:
    score, why = complexity("explain why, compare, evaluate, and design a strategy", 1)

    assert score == 2
    assert why == ["asks for reasoning (compare, design, evaluate)"]


def test_word_count_signals() -> None:
    assert complexity("word " * 40, 1) == (0, [])
    assert complexity("word " * 41, 1) == (1, ["41 words"])
    assert complexity("word " * 151, 1) == (2, ["151 words"])


def test_code_block_is_structured_input() -> None:
    assert complexity("Fix this:\n```\nprint(x)\n```", 1) == (1, ["structured input"])


# -- one member and determinism -----------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "Hi",
        "What is the capital of France?",
        "What is the current corporate tax rate in Ireland?",
        "Why does the contract's liability clause matter? Compare it with the usual one.",
    ],
)
def test_one_member_council_is_always_council(question: str) -> None:
    decision = ask(question, members=("openai:gpt-4o",))

    assert decision.mode == "council"
    assert decision.members == ("openai:gpt-4o",)


def test_one_member_reason_says_so_even_with_some_signals() -> None:
    # Score 1 is below the threshold: the council is chosen because it has one member, not
    # because the question is complex, and the stored reason must say that.
    decision = ask("What is the current corporate tax rate in Ireland?", members=("openai:gpt-4o",))

    assert decision.score < COMPLEX_THRESHOLD
    assert "member" in decision.reason
    assert "complex" not in decision.reason


def test_one_member_reason_for_a_plain_question() -> None:
    decision = ask("Hi", members=("openai:gpt-4o",))

    assert decision.reason == "single member"


def test_routing_is_deterministic() -> None:
    texts = [
        "What is the capital of France?",
        "Why does the contract's liability clause matter? Compare it with the usual one.",
        "Explain the history of the printing press. " * 30,
    ]
    first = [ask(t).to_dict() for t in texts]

    for _ in range(5):
        assert [ask(t).to_dict() for t in texts] == first


def test_route_to_dict_is_storable() -> None:
    assert ask("Hi").to_dict() == {
        "mode": "single",
        "members": ["google:gemini-2.0-flash"],
        "score": 0,
        "reason": f"simple (score 0 < {COMPLEX_THRESHOLD}: short, plain question); "
        "cheapest member google:gemini-2.0-flash",
    }


# -- members whose circuit is open (SPEC §5.4, §13) ---------------------------------------------


def down(*models: str) -> Callable[[str], bool]:
    return lambda model: model not in models


def test_a_simple_question_skips_the_cheapest_member_when_its_circuit_is_open() -> None:
    decision = route(
        [{"role": "user", "content": "What is the capital of France?"}],
        MEMBERS,
        price,
        healthy=down("google:gemini-2.0-flash"),
    )

    assert decision.mode == "single"
    assert decision.members == ("anthropic:claude-3-5-haiku-latest",)
    assert decision.reason == (
        f"simple (score 0 < {COMPLEX_THRESHOLD}: short, plain question); "
        "cheapest healthy member anthropic:claude-3-5-haiku-latest "
        "(circuit open: google:gemini-2.0-flash)"
    )


def test_a_simple_question_goes_to_the_cheapest_member_when_every_circuit_is_open() -> None:
    decision = route([{"role": "user", "content": "Hi"}], MEMBERS, price, healthy=lambda m: False)

    assert decision.members == ("google:gemini-2.0-flash",)
    assert decision.reason.endswith(
        "; every member's circuit is open, cheapest member google:gemini-2.0-flash"
    )


def test_a_complex_question_goes_to_the_council_minus_open_circuits() -> None:
    text = "Why does the contract's liability clause matter? Compare it with the usual one."

    decision = route([{"role": "user", "content": text}], MEMBERS, price, healthy=down("openai:gpt-4o"))

    assert decision.mode == "council"
    assert decision.members == ("anthropic:claude-3-5-haiku-latest", "google:gemini-2.0-flash")
    assert decision.reason.startswith("complex: ")
    assert decision.reason.endswith("; skipped (circuit open): openai:gpt-4o")


def test_a_complex_question_keeps_the_full_council_when_fewer_than_two_members_are_healthy() -> None:
    text = "Why does the contract's liability clause matter? Compare it with the usual one."

    decision = route(
        [{"role": "user", "content": text}],
        MEMBERS,
        price,
        healthy=down("openai:gpt-4o", "google:gemini-2.0-flash"),
    )

    assert decision.members == MEMBERS
    assert decision.reason.endswith(
        "; circuit open for openai:gpt-4o, google:gemini-2.0-flash: too few healthy members to leave out"
    )


def test_healthy_members_change_nothing() -> None:
    for text in ("Hi", "Why does the contract's liability clause matter? Compare it with the usual one."):
        assert ask(text) == route([{"role": "user", "content": text}], MEMBERS, price, healthy=lambda m: True)


# -- domains ------------------------------------------------------------------------------------

MEDICAL = DomainRule("medical", ("patient", "dosage"), ("anthropic:claude-3-5-haiku-latest", "openai:gpt-4o"))
CODE = DomainRule("code", ("python", "stack trace"), ("google:gemini-2.0-flash",))


def test_a_query_in_a_domain_goes_to_that_domains_members_and_says_so() -> None:
    decision = route(
        [{"role": "user", "content": "What dosage of ibuprofen is safe for a patient of 70 kg?"}],
        MEMBERS,
        price,
        domains=(CODE, MEDICAL),
    )
    # Simple by its complexity, so the cheapest of the domain's members (not of the council's).
    assert decision.mode == "single"
    assert decision.members == ("anthropic:claude-3-5-haiku-latest",)
    assert decision.reason.startswith("domain medical (names dosage, patient)")


def test_a_complex_query_in_a_domain_gets_the_domains_council() -> None:
    text = (
        "Explain step by step why this patient's dosage should change, compare the options and "
        "evaluate the trade-offs of each? And what would you recommend?"
    )
    decision = route([{"role": "user", "content": text}], MEMBERS, price, domains=(MEDICAL,))
    assert decision.mode == "council"
    assert decision.members == MEDICAL.members


def test_the_first_matching_domain_wins_and_a_phrase_matches_as_words() -> None:
    text = "Here is a Python stack trace from a patient record system."
    assert route([{"role": "user", "content": text}], MEMBERS, price, domains=(CODE, MEDICAL)).members == (
        "google:gemini-2.0-flash",
    )
    # "pythonic" is not "python": keywords match whole words.
    plain = route([{"role": "user", "content": "Is this pythonic?"}], MEMBERS, price, domains=(CODE,))
    assert plain.members == ("google:gemini-2.0-flash",) and not plain.reason.startswith("domain")


def test_domain_members_behind_an_open_circuit_are_left_out() -> None:
    text = "Explain why the patient's dosage matters, compare and evaluate the options? Recommend one."
    down = "openai:gpt-4o"
    decision = route(
        [{"role": "user", "content": text}], MEMBERS, price, healthy=lambda m: m != down, domains=(MEDICAL,)
    )
    # Two domain members, one down: too few healthy to leave out, so the domain's full council.
    assert decision.members == MEDICAL.members and "too few healthy" in decision.reason
