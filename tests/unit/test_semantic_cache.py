"""The semantic cache's embedding, gate and calibration (shared/semantic_cache.py): the shipped
paraphrase set at the default threshold, and that numbers, entities, order and negation keep
questions apart. No Redis, no model."""

from __future__ import annotations

import pytest

from shared.semantic_cache import (
    PARAPHRASES,
    SemanticHit,
    calibrate,
    load_pairs,
    similarity,
    single_turn,
    with_question,
)
from shared.settings import Settings

DEFAULT = Settings.model_fields["semantic_cache_threshold"].default


def test_the_default_threshold_keeps_false_positives_under_2_percent_on_the_shipped_set() -> None:
    pairs = load_pairs(PARAPHRASES)
    assert len(pairs) >= 200
    assert {p["label"] for p in pairs} == {"paraphrase", "negative"}
    assert sum(p["label"] == "negative" for p in pairs) >= 100
    result = calibrate(pairs, DEFAULT)
    assert result.false_positive_rate < 0.02
    assert result.hit_rate > 0.7
    # A looser threshold hits more and errs more: the calibration measures a real trade-off.
    loose = calibrate(pairs, 0.6)
    assert loose.hit_rate > result.hit_rate and loose.false_positive_rate > 0.02


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+2?", "What is 2+3?"),
        ("What is 2+2?", "What is 2*2?"),
        ("What is 10 divided by 2?", "What is 2 divided by 10?"),
        ("List three benefits of exercise.", "List five benefits of exercise."),
        ("What is the capital of France?", "What is the capital of Germany?"),
        ("Is it safe to drink tap water in Mexico?", "Is it not safe to drink tap water in Mexico?"),
        ("What does HTTP stand for?", "What does HTTPS stand for?"),
        ("Convert 100 degrees Fahrenheit to Celsius.", "Convert 100 degrees Celsius to Fahrenheit."),
    ],
)
def test_numbers_entities_order_and_negation_change_the_question(a: str, b: str) -> None:
    assert similarity(a, b) < DEFAULT


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2+2?", "what's 2 + 2"),
        ("List three benefits of exercise.", "List 3 benefits of exercise"),
        ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
        ("What is the largest ocean on Earth?", "Which ocean is the largest on Earth?"),
    ],
)
def test_rewordings_match(a: str, b: str) -> None:
    assert similarity(a, b) >= DEFAULT
    assert similarity(a, a) == pytest.approx(1.0, abs=1e-6)


def test_only_single_turn_calls_are_answered_and_the_context_must_be_identical() -> None:
    user = {"role": "user", "content": "What is 2+2?"}
    system = {"role": "system", "content": "Be brief."}
    plain = single_turn([user], 100, None)
    assert plain is not None and plain[1] == "What is 2+2?"
    grounded = single_turn([system, user], 100, None)
    assert grounded is not None and grounded[0] != plain[0]
    assert single_turn([user], 200, None) != plain  # other parameters, another context
    assert single_turn([user], 100, 0.5) != plain
    assert single_turn([user, {"role": "assistant", "content": "4"}, user], 100, None) is None
    assert with_question([system, user], "what's 2 + 2") == [
        system,
        {"role": "user", "content": "what's 2 + 2"},
    ]


def test_a_semantic_hit_is_stored_as_a_plain_cached_call() -> None:
    from shared.ledger import CallRecord

    record = CallRecord("sim:a", "answer", 0, "cached", None, 1, 0, 0, 0.0, 1, saved_usd=0.5)
    hit = SemanticHit.of(record, 0.91, "what's 2 + 2")
    assert hit.row() == record.row()
    assert hit.similarity == 0.91 and hit.matched == "what's 2 + 2"


def test_the_mirror_scores_every_row_as_similarity_does_across_rebuilds_and_trims() -> None:
    from shared.semantic_cache import TAIL, _Mirror, question

    texts = [f"How do I sort a list of {n} items in Python?" for n in range(4 * TAIL)]
    size = 2 * TAIL
    mirror = _Mirror()
    q = question("How can I sort a Python list of 5 items?")

    def check() -> None:
        scores = mirror.scores(q)
        assert scores == pytest.approx([_cosine(q, question(t)) for t in mirror.texts], abs=1e-5)

    mirror.extend([(t, n) for n, t in enumerate(texts[:TAIL])], size)
    check()  # builds the matrix
    mirror.extend([(t, n) for n, t in enumerate(texts[TAIL : TAIL + 10])], size)
    check()  # the 10 new rows are scored apart
    assert mirror.base == TAIL
    mirror.extend([(t, n) for n, t in enumerate(texts[TAIL + 10 :])], size)
    assert len(mirror.texts) == size and mirror.texts[0] == texts[-size]  # the oldest trimmed
    check()


def _cosine(a: object, b: object) -> float:
    import numpy as np

    from shared.semantic_cache import DIM, Question

    assert isinstance(a, Question) and isinstance(b, Question)
    dense_a, dense_b = np.zeros(DIM, np.float32), np.zeros(DIM, np.float32)
    dense_a[a.indices], dense_b[b.indices] = a.values, b.values
    return float(dense_a @ dense_b)
