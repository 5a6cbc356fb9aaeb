"""The FINAL RANKING parser (strict list, tolerant surroundings) and the mean-rank aggregate."""

from __future__ import annotations

import pytest

from workers.council.ranking import (
    InvalidRanking,
    RankEntry,
    aggregate_ranking,
    parse_final_ranking,
    strip_final_ranking,
)

LABELS = ["Response A", "Response B", "Response C"]
EXPECTED = ["Response C", "Response A", "Response B"]


@pytest.mark.parametrize(
    "text",
    [
        "Good work all round.\n\nFINAL RANKING:\n1. Response C\n2. Response A\n3. Response B",
        "FINAL RANKING:\n1) Response C\n2) Response A\n3) Response B\n",
        "**FINAL RANKING:**\n1. Response C\n2. Response A\n3. Response B",
        "## Final Ranking\n1. Response C\n2. Response A\n3. Response B",
        "final ranking\n1. Response C\n2. Response A\n3. Response B",
        "FINAL RANKING:\n**1. Response C**\n**2. Response A**\n**3. Response B**",
        "FINAL RANKING:\n1. **Response C**\n2. **Response A**\n3. **Response B**",
        "FINAL RANKING:\n1. Response C - most accurate\n2. Response A (close)\n3. Response B: vague",
        "FINAL RANKING:\n\n\n1. Response C\n2. Response A\n3. Response B",
        "FINAL RANKING:\n1. response c\n2. RESPONSE A\n3. Response   B",
        "FINAL RANKING: 1. Response C\n2. Response A\n3. Response B",
        "FINAL RANKING:\n```\n1. Response C\n2. Response A\n3. Response B\n```",
        "FINAL RANKING:\n1. Response C\n\n2. Response A\n\n3. Response B",
        "FINAL RANKING:\n1. Response C\n2. Response A\n3. Response B\n\nThanks for reading.",
        "FINAL RANKING:\n1. Response C\n2. Response A\n3. Response B\nI hope this final ranking helps.",
    ],
)
def test_accepts_tolerant_variants(text: str) -> None:
    assert parse_final_ranking(text, LABELS) == EXPECTED


def test_uses_the_last_marker() -> None:
    text = (
        "Draft FINAL RANKING:\n1. Response A\n2. Response B\n3. Response C\n\n"
        "On reflection C is better.\n\nFINAL RANKING:\n1. Response C\n2. Response A\n3. Response B"
    )
    assert parse_final_ranking(text, LABELS) == EXPECTED


def test_last_marker_is_strict_even_if_an_earlier_list_was_valid() -> None:
    text = "FINAL RANKING:\n1. Response A\n2. Response B\n3. Response C\nFINAL RANKING:\n1. Response A"
    with pytest.raises(InvalidRanking, match="missing"):
        parse_final_ranking(text, LABELS)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Response C is best, then A, then B.", "no FINAL RANKING"),
        ("FINAL RANKING: C, A, B", "no numbered list"),
        ("FINAL RANKING:\nResponse C\nResponse A\nResponse B", "no numbered list"),
        ("FINAL RANKING:\n1. Response C\n2. Response C\n3. Response B", "duplicate"),
        ("FINAL RANKING:\n1. Response C\n2. Response D\n3. Response B", "unknown label 'Response D'"),
        ("FINAL RANKING:\n1. Response C\n2. Response AB\n3. Response B", "unknown label 'Response AB'"),
        ("FINAL RANKING:\n1. Response C\n2. Response A", "missing label.*Response B"),
        ("FINAL RANKING:\n1. Response C\n2. Response A\nand then\n3. Response B", "missing"),
        ("FINAL RANKING:\n1. Response C\n3. Response A\n4. Response B", "entry 2 is numbered 3"),
        ("FINAL RANKING:\n0. Response C\n1. Response A\n2. Response B", "entry 1 is numbered 0"),
        ("FINAL RANKING:\n1. Response C\n1. Response A\n2. Response B", "entry 2 is numbered 1"),
        ("FINAL RANKING:\n1. Response C\n2. Response A\n3. Response B\n4. Response A", "duplicate"),
        ("FINAL RANKING:\nSee above.\n1. Response C\n2. Response A\n3. Response B", "no numbered list"),
    ],
)
def test_rejects_bad_lists_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidRanking, match=reason):
        parse_final_ranking(text, LABELS)


def test_invalid_ranking_is_a_value_error() -> None:
    assert issubclass(InvalidRanking, ValueError)


def test_single_label() -> None:
    assert parse_final_ranking("Fine.\nFINAL RANKING:\n1. Response A", ["Response A"]) == ["Response A"]


def test_strip_final_ranking_keeps_only_the_evaluation() -> None:
    text = "A is vague; B is right.\n\n**FINAL RANKING:**\n1. Response B\n2. Response A"
    assert strip_final_ranking(text) == "A is vague; B is right."
    assert strip_final_ranking("  no ranking here ") == "no ranking here"


def test_aggregate_mean_rank_and_votes() -> None:
    entries = aggregate_ranking(
        ["m1", "m2", "m3", "m4"],
        [["m2", "m3"], ["m3", "m1"], ["m2", "m1", "m3"]],
    )
    assert entries == [
        RankEntry("m2", 1.0, 2),
        RankEntry("m1", 2.0, 2),
        RankEntry("m3", 2.0, 3),
        RankEntry("m4", None, 0),
    ]


def test_aggregate_rounds_to_four_decimals() -> None:
    entries = aggregate_ranking(["m1", "m2", "m3"], [["m1", "m2"], ["m2", "m1"], ["m2", "m1"]])
    assert entries == [RankEntry("m2", 1.3333, 3), RankEntry("m1", 1.6667, 3), RankEntry("m3", None, 0)]


def test_aggregate_without_rankings_keeps_model_order() -> None:
    assert aggregate_ranking(["b", "a"], []) == [RankEntry("b", None, 0), RankEntry("a", None, 0)]


@pytest.mark.parametrize(
    ("models", "rankings"),
    [(["m1", "m1"], []), (["m1"], [["m2"]]), (["m1", "m2"], [["m1", "m1"]])],
)
def test_aggregate_refuses_inconsistent_input(models: list[str], rankings: list[list[str]]) -> None:
    with pytest.raises(ValueError):
        aggregate_ranking(models, rankings)
