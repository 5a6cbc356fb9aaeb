"""The experiments' assignment and statistics (shared.analytics.experiments), without a database."""

from __future__ import annotations

import random

import pytest
from scipy import stats

from shared.analytics.experiments import Sample, _sample, choose, p_value, peer_score, point


def test_points_are_stable_and_uniform() -> None:
    # Pinned: a change of the hash would move every running experiment's queries.
    assert point("exp_x", "a") == pytest.approx(0.15095086111665218)
    points = [point("exp_y", f"c-{i}") for i in range(20_000)]
    assert stats.kstest(points, "uniform").pvalue > 0.001


def test_choose_follows_the_cumulative_weights_and_skips_zero() -> None:
    variants = [{"name": "a", "weight": 1}, {"name": "z", "weight": 0}, {"name": "b", "weight": 3}]
    assert choose(variants, 0.0)["name"] == "a"
    assert choose(variants, 0.2499)["name"] == "a"
    assert choose(variants, 0.25)["name"] == "b"
    assert choose(variants, 0.999999999)["name"] == "b"
    assert choose([{"name": "a", "weight": 0}, {"name": "b", "weight": 5}], 0.1)["name"] == "b"


def test_welch_from_grouped_sums_matches_scipy_on_the_raw_values() -> None:
    rng = random.Random(7)
    a = [rng.gauss(1.0, 0.3) for _ in range(120)]
    b = [rng.gauss(1.1, 0.5) for _ in range(280)]
    sa = _sample(len(a), sum(a), sum(x * x for x in a))
    sb = _sample(len(b), sum(b), sum(x * x for x in b))
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert p_value(sa, sb, "cost") == pytest.approx(expected, rel=1e-6)


def test_two_proportions() -> None:
    a, b = Sample(200, 0.05, 0.05 * 0.95, 10), Sample(200, 0.15, 0.15 * 0.85, 30)
    p = p_value(a, b, "failure_rate")
    assert p is not None and 0.0005 < p < 0.002  # z = 3.33
    assert p_value(Sample(1, 0.0, 0.0), b, "failure_rate") is None


def test_peer_score() -> None:
    ranking = [{"model": "a", "mean_rank": 1.0, "votes": 3}, {"model": "b", "mean_rank": 2.0, "votes": 3}]
    assert peer_score({"aggregate_ranking": ranking}) == 1.0
    ranking[0]["mean_rank"] = 1.5
    assert peer_score({"aggregate_ranking": ranking}) == 0.5
    assert peer_score({"aggregate_ranking": ranking[:1]}) is None and peer_score(None) is None
