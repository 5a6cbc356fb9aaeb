"""The analytics statistics against known answers: Bradley–Terry, Wilson, Kendall's W, percentiles."""

from __future__ import annotations

import math
import random

import pytest

from shared.analytics.fitting import (
    bradley_terry,
    kendall_w,
    latency_bucket,
    percentile,
    proportion_interval,
)


def test_bradley_terry_recovers_known_strengths_and_covers_them() -> None:
    truth = {"a": 1.0, "b": 0.0, "c": -1.0}
    rng = random.Random(7)
    wins: dict[tuple[str, str], int] = {}
    for i, x in enumerate(truth):
        for y in list(truth)[i + 1 :]:
            p = 1 / (1 + math.exp(truth[y] - truth[x]))
            for _ in range(2000):
                pair = (x, y) if rng.random() < p else (y, x)
                wins[pair] = wins.get(pair, 0) + 1
    fit = bradley_terry(list(truth), wins)
    for model, theta in truth.items():
        assert fit[model].ci_low < theta < fit[model].ci_high, (model, fit[model])
        assert abs(fit[model].score - theta) < 0.1
    assert fit["a"].comparisons == 4000
    assert sum(s.score for s in fit.values()) == pytest.approx(0, abs=1e-9)


def test_bradley_terry_keeps_an_unbeaten_model_finite_and_leaves_out_the_unseen() -> None:
    fit = bradley_terry(["a", "b", "chair"], {("a", "b"): 50})
    assert set(fit) == {"a", "b"}
    assert math.isfinite(fit["a"].score) and fit["a"].score > fit["b"].score
    # A model in no comparison does not widen the others' intervals.
    wins = {("a", "b"): 300, ("b", "a"): 100}
    alone = bradley_terry(["a", "b"], wins)["a"]
    beside = bradley_terry(["a", "b", "chair"], wins)["a"]
    assert beside.ci_high - beside.ci_low == pytest.approx(alone.ci_high - alone.ci_low)


def test_two_equal_models_have_overlapping_intervals_around_zero() -> None:
    fit = bradley_terry(["a", "b"], {("a", "b"): 100, ("b", "a"): 100})
    assert fit["a"].score == pytest.approx(0, abs=1e-9)
    assert fit["a"].ci_low < 0 < fit["a"].ci_high


def test_wilson_interval_matches_the_textbook_value() -> None:
    # Wilson 95% for 81/263 (Newcombe 1998, example): 0.2553 to 0.3662.
    low, high = proportion_interval(81, 263) or (0, 0)
    assert low == pytest.approx(0.2553, abs=1e-4)
    assert high == pytest.approx(0.3662, abs=1e-4)
    assert proportion_interval(0, 0) is None


def test_kendall_w_is_one_for_unanimous_reviewers_and_low_for_contrary_ones() -> None:
    # Three answers, each reviewer ranks the two that are not its own.
    assert kendall_w([["b", "c"], ["a", "c"], ["a", "b"]]) == (pytest.approx(1.0), pytest.approx(0.75))
    assert kendall_w([["c", "b"], ["a", "c"], ["b", "a"]]) == (pytest.approx(0.0), pytest.approx(0.75))
    # Four answers ranked three at a time, all in the order a < b < c < d.
    unanimous = [["b", "c", "d"], ["a", "c", "d"], ["a", "b", "d"], ["a", "b", "c"]]
    assert kendall_w(unanimous) == (pytest.approx(1.0), pytest.approx(3 * 8 / (4 * 15)))


def test_kendall_w_chance_level_is_what_random_reviewers_average() -> None:
    rng = random.Random(11)
    items = ["a", "b", "c", "d"]
    draws = []
    chance = 0.0
    for _ in range(20_000):
        rankings = [rng.sample([m for m in items if m != own], 3) for own in items]
        concordance = kendall_w(rankings)
        assert concordance is not None
        draws.append(concordance.w)
        chance = concordance.chance
    assert sum(draws) / len(draws) == pytest.approx(chance, abs=0.01)


def test_kendall_w_refuses_an_unbalanced_design() -> None:
    assert kendall_w([["b", "c"], ["a", "c"]]) is None  # a and b are never side by side
    assert kendall_w([["a"], ["b"]]) is None
    assert kendall_w([]) is None


def test_percentiles_from_buckets_are_within_five_percent() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(5, 1) for _ in range(20_000)]
    histogram: dict[int, int] = {}
    for v in values:
        b = latency_bucket(v)
        histogram[b] = histogram.get(b, 0) + 1
    values.sort()
    for q in (0.5, 0.95):
        exact = values[int(q * len(values))]
        assert percentile(histogram, q) == pytest.approx(exact, rel=0.06)
    assert percentile({}, 0.5) is None
    assert latency_bucket(0.2) == 0
