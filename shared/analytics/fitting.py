"""The statistics behind the analytics (SPEC §13): pure functions of counts, no I/O.

- ``bradley_terry``: pairwise strengths from "ranked above" counts. No well-kept Python library
  fits Bradley–Terry (``choix`` is not packaged here; the PyPI packages that are are months-old
  one-author projects), so it is a Newton fit of the log-likelihood, a few lines of numpy, with
  intervals from the Fisher information (the inverse Hessian at the optimum). A weak ridge
  (``RIDGE``: a normal prior of variance 100 on each log-strength) keeps a model that never lost
  finite and fixes the scale's origin (log-strengths sum to zero); with hundreds of comparisons
  its pull on the estimates is under 0.1%.
- ``proportion_interval``: Wilson's interval for a binomial rate (scipy.stats).
- ``kendall_w``: Kendall's coefficient of concordance for one query's reviews. A reviewer never
  ranks its own answer, so the reviews of a council whose members all answered form a balanced
  incomplete block design (t answers, each reviewer ranks k = t − 1 of them, each pair of answers
  side by side in λ = t − 2 reviews); Kendall's W for such a design is
  ``12 S / (λ² t (t² − 1))`` with ``S`` the squared deviations of the rank sums from their mean.
  It is 1 when every reviewer orders the answers the same way; for a complete design it reduces
  to the classic formula. Its chance level depends on the design and is returned with it.
- Latency histograms: ``latency_bucket`` and ``percentile`` over buckets ``BUCKET_RATIO`` apart,
  so a percentile read from a rollup is within ±5% of the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

RIDGE = 0.01
BUCKET_RATIO = 1.1
_LOG_RATIO = math.log(BUCKET_RATIO)


@dataclass(frozen=True)
class Strength:
    """A model's log-strength (0: the average model), its interval and its number of comparisons."""

    score: float
    ci_low: float
    ci_high: float
    comparisons: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "score": round(self.score, 4),
            "ci_low": round(self.ci_low, 4),
            "ci_high": round(self.ci_high, 4),
            "comparisons": self.comparisons,
        }


def bradley_terry(
    models: Sequence[str], wins: Mapping[tuple[str, str], int], confidence: float = 0.95
) -> dict[str, Strength]:
    """Strengths of ``models`` from ``wins[(winner, loser)]``; a model in no comparison is left out.

    P(i ranked above j) = 1 / (1 + exp(θj − θi)).
    """
    # Only models in some comparison: one that is in none would widen every interval (the centring
    # would share its unbounded uncertainty out among the others).
    compared = {m for pair, count in wins.items() if count > 0 and pair[0] != pair[1] for m in pair}
    index = {m: i for i, m in enumerate(m for m in models if m in compared)}
    k = len(index)
    if k == 0:
        return {}
    w = np.zeros((k, k))
    for (winner, loser), count in wins.items():
        if winner in index and loser in index and winner != loser:
            w[index[winner], index[loser]] += count
    n = w + w.T
    theta = np.zeros(k)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        gradient = (w - n * p).sum(axis=1) - RIDGE * theta
        curvature = n * p * (1 - p)
        hessian = curvature - np.diag(curvature.sum(axis=1) + RIDGE)
        step = np.linalg.solve(hessian, gradient)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))
    curvature = n * p * (1 - p)
    information = np.diag(curvature.sum(axis=1) + RIDGE) - curvature
    covariance = np.linalg.inv(information)
    # Strengths are only defined up to a common shift: report them centred (sum zero).
    centre = np.eye(k) - 1.0 / k
    covariance = centre @ covariance @ centre
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    result: dict[str, Strength] = {}
    for model, i in index.items():
        comparisons = int(n[i].sum())
        if comparisons == 0:
            continue
        se = math.sqrt(max(float(covariance[i, i]), 0.0))
        score = float(theta[i])
        result[model] = Strength(score, score - z * se, score + z * se, comparisons)
    return result


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson's interval for ``successes / trials``; None without trials."""
    if trials <= 0:
        return None
    ci = stats.binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


class Concordance(NamedTuple):
    w: float
    chance: float  # W's expectation when every reviewer ranks at random, for this design


def kendall_w(rankings: Sequence[Sequence[str]]) -> Concordance | None:
    """Kendall's W of one query's valid rankings (each a list of models, best first), or None
    when they do not form a balanced design of at least three answers ranked two or more at a time.

    With reviewers ranking at random each rank sum has variance r (k² − 1) / 12, so W's
    expectation is r (k² − 1) / (λ² (t² − 1)): 1/m for m complete rankings, but 0.75 for three
    members each ranking the other two (W is then 0 or 1), which is why the chance level is
    reported beside W."""
    if not rankings:
        return None
    block = len(rankings[0])
    if block < 2 or any(len(r) != block or len(set(r)) != block for r in rankings):
        return None
    items = sorted({m for r in rankings for m in r})
    t = len(items)
    if t < 3:
        return None
    together: dict[tuple[str, str], int] = {}
    appearances = dict.fromkeys(items, 0)
    rank_sums = dict.fromkeys(items, 0)
    for ranking in rankings:
        for place, model in enumerate(ranking, start=1):
            appearances[model] += 1
            rank_sums[model] += place
        for i, a in enumerate(ranking):
            for b in ranking[i + 1 :]:
                pair = (a, b) if a < b else (b, a)
                together[pair] = together.get(pair, 0) + 1
    replication = set(appearances.values())
    pair_counts = {together.get((a, b), 0) for i, a in enumerate(items) for b in items[i + 1 :]}
    if len(replication) != 1 or len(pair_counts) != 1:
        return None
    r = replication.pop()
    lam = pair_counts.pop()
    if lam == 0:
        return None
    mean = r * (block + 1) / 2
    s = sum((rank_sums[m] - mean) ** 2 for m in items)
    w = 12 * s / (lam**2 * t * (t * t - 1))
    return Concordance(w, r * (block * block - 1) / (lam**2 * (t * t - 1)))


def latency_bucket(latency_ms: float) -> int:
    """0 for under 1 ms; bucket b ≥ 1 holds [1.1^(b−1), 1.1^b) ms."""
    if latency_ms < 1:
        return 0
    return 1 + int(math.log(latency_ms) / _LOG_RATIO)


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q``-quantile (0..1) of a bucketed histogram: the geometric middle of its bucket."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank and histogram[bucket] > 0:
            return 0.0 if bucket == 0 else BUCKET_RATIO ** (bucket - 0.5)
    return BUCKET_RATIO ** (max(histogram) - 0.5)
