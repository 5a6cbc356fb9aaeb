"""Semantic-cache calibration (SPEC §14, issue 18): hit rate on paraphrase pairs and false-positive
rate on hard negatives (other numbers, entities, negation, word order) of the shipped set
``shared/cache_data/paraphrases.jsonl``, at several similarity thresholds, the default marked.
Offline and model-free: the embedding is ``shared/semantic_cache.py``'s hashed n-grams.

    python -m benchmarks.semantic_calibration [--thresholds 0.75 0.8 0.85 0.9] [--show-misses]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import print_table
from shared.semantic_cache import (
    INDEX_SIZE,
    PARAPHRASES,
    _Mirror,
    calibrate,
    load_pairs,
    question,
    similarity,
)
from shared.settings import Settings


def lookup_ms(pairs: list[dict[str, str]], rounds: int = 300) -> float:
    """A worker's CPU per semantic lookup in a full mirror (no Redis: the round trip is apart)."""
    mirror = _Mirror()
    texts = [f"{p['a']} ({n})" for n in range(INDEX_SIZE) for p in pairs][:INDEX_SIZE]
    mirror.extend([(t, n) for n, t in enumerate(texts)], INDEX_SIZE)
    mirror.scores(question(pairs[0]["b"]))  # the matrix is built once per TAIL additions
    started = time.perf_counter()
    for n in range(rounds):
        mirror.scores(question(pairs[n % len(pairs)]["b"]))
    return (time.perf_counter() - started) * 1000 / rounds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, default=PARAPHRASES)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--show-misses", action="store_true", help="list the pairs each side gets wrong")
    args = parser.parse_args()
    default = Settings.model_fields["semantic_cache_threshold"].default
    thresholds = sorted({*args.thresholds, default})
    pairs = load_pairs(args.pairs)
    started = time.perf_counter()
    rows = []
    for threshold in thresholds:
        c = calibrate(pairs, threshold)
        rows.append(
            (
                f"{threshold:.2f}" + (" (default)" if threshold == default else ""),
                f"{c.hits}/{c.paraphrases}",
                f"{c.hit_rate:.1%}",
                f"{c.false_hits}/{c.negatives}",
                f"{c.false_positive_rate:.1%}",
            )
        )
    per_pair_ms = (time.perf_counter() - started) * 1000 / (len(pairs) * len(thresholds))
    kinds = Counter(p.get("kind", "paraphrase") for p in pairs)
    print_table(
        f"semantic cache on {args.pairs.name}: {len(pairs)} pairs ({dict(kinds)})",
        ["threshold", "paraphrases hit", "hit rate", "negatives hit", "false-positive rate"],
        rows,
    )
    print(f"{per_pair_ms:.3f} ms per pair (two embeddings and a cosine)")
    print(f"{lookup_ms(pairs):.3f} ms per lookup over {INDEX_SIZE:,} indexed questions (embed + brute force)")
    if args.show_misses:
        for p in pairs:
            s = similarity(p["a"], p["b"])
            wrong = (p["label"] == "paraphrase") == (s < default)
            if wrong:
                print(f"{p['label']:10} {s:.3f}  {p['a']!r}  ~  {p['b']!r}")


if __name__ == "__main__":
    main()
