"""Reading a reviewer's ``FINAL RANKING`` and combining the valid ones (SPEC §5.1).

Owns the ranking parser (strict about the numbered list, tolerant of everything around it) and
the mean-rank arithmetic. It does not build labels or prompts (``prompts.py``) and does not
decide what an invalid review means for a query (``stages.py``). Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


class InvalidRanking(ValueError):
    """A review's ranking cannot be used; the message says why (shown in the review's record)."""


@dataclass
class RankEntry:
    model: str
    mean_rank: float | None  # 1 = best; None when no valid review ranked the model
    votes: int


_MARKER = re.compile(r"final\s+ranking", re.IGNORECASE)
# `1. Response C`, `1) Response C`, `**1. Response C**`, `1. **Response C** - best`. The label is a
# whole token, so `Response AB` is read as the (unknown) label AB, never as A.
_ENTRY = re.compile(r"\s*[*_]*\s*(\d+)\s*[.)]\s*[*_]*\s*(response\s+[a-z]+)\b.*", re.IGNORECASE)
# Markdown around a list (code fences, rules, stray emphasis) that may sit before its first entry.
_DECORATION = re.compile(r"[\s`*_#=>-]*")
_MARKER_LINE_REST = " \t:*_#"


def parse_final_ranking(text: str, labels: Sequence[str]) -> list[str]:
    """Return ``labels`` (e.g. ``"Response A"``) best first, as ranked after the FINAL RANKING line.

    Raises ``InvalidRanking`` unless the list numbers 1..n in order and names every label once.
    """
    by_key = {_label_key(label): label for label in labels}
    if len(by_key) != len(labels):
        raise ValueError("labels must be distinct")
    ranked: list[str] = []
    for position, (number, token) in enumerate(_locate_ranking(text)[1], start=1):
        if number != position:
            raise InvalidRanking(f"entry {position} is numbered {number}")
        label = by_key.get(_label_key(token))
        if label is None:
            raise InvalidRanking(f"unknown label {token!r}")
        if label in ranked:
            raise InvalidRanking(f"duplicate label {label!r}")
        ranked.append(label)
    missing = [label for label in labels if label not in ranked]
    if missing:
        raise InvalidRanking(f"missing label(s): {', '.join(missing)}")
    return ranked


def strip_final_ranking(text: str) -> str:
    """The review's evaluation without its ranking list (the whole text if no list is found)."""
    try:
        start, _ = _locate_ranking(text)
    except InvalidRanking:
        return text.strip()
    return text[:start].strip()


def aggregate_ranking(models: Sequence[str], rankings: Sequence[Sequence[str]]) -> list[RankEntry]:
    """Mean rank (1 = best) and vote count per model over ``rankings`` (model ids, best first).

    Sorted by mean rank, unranked models last, ties in the order of ``models``.
    """
    if len(set(models)) != len(models):
        raise ValueError("models must be distinct")
    totals = dict.fromkeys(models, 0)
    votes = dict.fromkeys(models, 0)
    for ranking in rankings:
        if len(set(ranking)) != len(ranking):
            raise ValueError("a ranking names a model twice")
        for position, model in enumerate(ranking, start=1):
            if model not in totals:
                raise ValueError(f"a ranking names unknown model {model!r}")
            totals[model] += position
            votes[model] += 1
    entries = [
        RankEntry(model, round(totals[model] / votes[model], 4) if votes[model] else None, votes[model])
        for model in models
    ]
    # sort() is stable, so equal means keep the order of `models`.
    entries.sort(key=lambda e: (e.mean_rank is None, e.mean_rank or 0.0))
    return entries


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def _locate_ranking(text: str) -> tuple[int, list[tuple[int, str]]]:
    """Find the last marker that is followed by a list: (start of its line, [(number, label)])."""
    markers = list(_MARKER.finditer(text))
    if not markers:
        raise InvalidRanking("no FINAL RANKING line")
    # A marker with no list after it is prose ("I hope this final ranking helps"), not the ranking.
    for marker in reversed(markers):
        line_start = text.rfind("\n", 0, marker.start()) + 1
        line_end = text.find("\n", marker.end())
        rest = text[marker.end() : len(text) if line_end == -1 else line_end]
        following = [] if line_end == -1 else text[line_end + 1 :].splitlines()
        entries = _read_entries([rest.lstrip(_MARKER_LINE_REST), *following])
        if entries:
            return line_start, entries
    raise InvalidRanking("no numbered list after FINAL RANKING")


def _read_entries(lines: list[str]) -> list[tuple[int, str]]:
    entries: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        match = _ENTRY.fullmatch(line)
        if match:
            entries.append((int(match[1]), match[2]))
        elif entries:
            if line.strip():
                break  # the list ends at the first line that is not an entry
        # Before the first entry: the rest of the marker line may be prose; later lines may only
        # be blank or markdown decoration.
        elif index > 0 and not _DECORATION.fullmatch(line):
            break
    return entries
