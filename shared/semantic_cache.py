"""The semantic cache (SPEC §14): a single-turn question close enough to one answered before
reuses that question's cached answers, per tenant, never across tenants.

**The embedding** is deterministic and needs no model (nothing to download, at run time or in
CI): the normalised question's content words (stop words dropped, plurals folded), their
bigrams (word order) and their character trigrams (spelling variants: summarise/summarize),
hashed into 2^20 dimensions with CRC-32 (stable across processes, unlike ``hash``) and
L2-normalised; similarity is their cosine. It is lexical, so it knows rewordings, not
synonyms: "Who wrote X?" and "Who is the author of X?" stay apart (a miss costs a call, a false
hit a wrong answer). On top of the cosine a **gate**: two questions can match only when their
numbers and arithmetic operators, in order, and their negation are the same ("2+2" never answers
"2+3", "three" is 3, "is it not safe" never answers "is it safe"): hard negatives are lexically
closer than most paraphrases, so no cosine threshold alone keeps them apart.

``CONCLAVE_SEMANTIC_CACHE_THRESHOLD`` (default 0.85) was set on the shipped paraphrase set
``shared/cache_data/paraphrases.jsonl`` (105 paraphrase pairs, 111 hard negatives) with
``benchmarks/semantic_calibration.py``: at 0.85 84% of paraphrases hit and no negative does;
at 0.80 88% hit and 1.8% of negatives (2 of 111) would, too close to the 2% bound to ship.

**What may be answered from it**: stage 1 calls (answers) of a batch with ``cache: "semantic"``
whose messages are system messages (the user's, the knowledge context) and exactly one user
message. The system text, ``max_tokens`` and ``temperature`` must be identical: they form the
*context* of the question, and only questions of one context are compared. A match does not
carry an answer itself: it names the earlier question, and the answer comes from the exact
cache (``shared/cache.py``) under that question's messages, so the exact cache's TTL,
per-model and per-tenant invalidation and tenant isolation hold for semantic hits as they are.
Reviews and syntheses are never matched semantically (their inputs hold the answers); they go
through the exact cache as in ``exact`` mode.

**The index**: per tenant and context a sorted set of the questions answered, scored by an
insertion sequence, holding the latest ``INDEX_SIZE``; its TTL is the exact cache's. Each process
keeps a mirror of the indexes it reads (``MIRRORS`` of them, least recently used dropped): a
lookup asks Redis only for entries newer than the mirror's sequence (one small script run) and
embeds just those, then brute-forces the cosine over at most ``INDEX_SIZE`` rows (a sparse
matrix-vector product). A Redis error makes the semantic cache step aside (a miss).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import redis.asyncio as aioredis
from scipy import sparse

from shared import keys
from shared.ledger import CallRecord

log = logging.getLogger("conclave.cache")

DEFAULT_THRESHOLD = 0.85
INDEX_SIZE = 2000  # questions kept per tenant and context: the brute force's bound
MIRRORS = 256  # indexes mirrored per process
TAIL = 64  # questions scored outside the matrix before it is rebuilt
CANDIDATES = 3  # matches above the threshold tried, best first, for a model's cached answer
DIM = 1 << 20

_WORD_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.5
_TRIGRAM_WEIGHT = 0.15

_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "about",
        "into",
        "onto",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "doing",
        "i",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "how",
        "why",
        "when",
        "where",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "please",
        "tell",
        "give",
        "explain",
        "describe",
        "exactly",
        "and",
        "or",
        "so",
        "if",
        "as",
        "just",
        "some",
        "any",
        "one",
        "way",
        "kind",
        "s",
        "use",
        "using",
        "get",
        "let",
        "us",
        "really",
        "actually",
        "today",
    ]
)
_NEGATIONS = frozenset({"not", "no", "never", "without", "nor", "cannot"})
_NUMBER_WORDS = {
    w: str(n)
    for n, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
del _NUMBER_WORDS["one"]  # "which one", "in one pound": a stop word, not a number
_NUMBER_WORDS.update(
    {"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000", "million": "1000000"}
)
_OPERATOR_WORDS = {"plus": "+", "minus": "-", "times": "*", "multiplied": "*", "divided": "/", "percent": "%"}
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b", re.I), "can not"),
    (re.compile(r"\bwon't\b", re.I), "will not"),
    (re.compile(r"n't\b", re.I), " not"),
    (re.compile(r"'s\b", re.I), ""),  # what's → what (a stop word either way); germany's → germany
    (re.compile(r"'(re|ve|ll|d|m)\b", re.I), ""),
)
_TIMES = re.compile(r"(\d)\s*[x×]\s*(\d)")
_HYPHEN = re.compile(r"(?<=[a-z])-(?=[a-z])")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+|[-+*/%^=<>]")
# The word after one of these says which way a question goes ("Fahrenheit to Celsius" is not
# "Celsius to Fahrenheit"): it gets a feature of its own.
_DIRECTIONS = {"to": "to", "into": "to", "from": "from", "than": "than"}


@dataclass(frozen=True)
class Question:
    """A question as the cache compares it: its gate and its unit-length hashed vector."""

    gate: tuple[str, ...]
    indices: np.ndarray
    values: np.ndarray


def tokens(text: str) -> list[str]:
    """Lower-case words, numbers (number words as digits) and arithmetic operators, in order.
    An acronym (HTTPS) comes back upper-case so that it is not folded like a plural."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    text = _HYPHEN.sub(" ", _TIMES.sub(r"\1*\2", text))
    out = []
    for token in _TOKEN.findall(text):
        if token[0].isdigit():
            out.append(token.replace(",", ""))
            continue
        lower = token.lower()
        token = token if len(token) > 1 and token.isupper() else lower
        out.append(_NUMBER_WORDS.get(lower, _OPERATOR_WORDS.get(lower, token)))
    return out


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def question(text: str) -> Question:
    """The gate and the embedding of ``text``."""
    toks = tokens(text)
    gate = tuple(t for t in toks if not t.isalpha())
    if any(t.lower() in _NEGATIONS for t in toks):
        gate += ("¬",)
    words = []
    directed = []
    heading = ""
    for t in toks:
        if t in _DIRECTIONS:
            heading = _DIRECTIONS[t]
        elif t.isalpha() and t.lower() not in _STOP and t.lower() not in _NEGATIONS:
            word = t.lower() if t.isupper() else _stem(t)
            words.append(word)
            if heading:
                directed.append(f"{heading}:{word}")
                heading = ""
    weights: dict[int, float] = {}

    def add(feature: str, weight: float) -> None:
        index = zlib.crc32(feature.encode()) & (DIM - 1)
        weights[index] = weights.get(index, 0.0) + weight

    for token in gate:  # equal in any two questions compared: a question of numbers only
        add("g:" + token, _WORD_WEIGHT)
    for feature in directed:
        add("d:" + feature, _WORD_WEIGHT)

    for word in words:
        add("w:" + word, _WORD_WEIGHT)
        padded = f"<{word}>"
        for i in range(len(padded) - 2):
            add("c:" + padded[i : i + 3], _TRIGRAM_WEIGHT)
    for first, second in itertools.pairwise(words):
        add(f"b:{first} {second}", _BIGRAM_WEIGHT)
    indices = np.fromiter(weights, dtype=np.int64, count=len(weights))
    values = np.fromiter(weights.values(), dtype=np.float32, count=len(weights))
    norm = float(np.linalg.norm(values))
    return Question(gate, indices, values / norm if norm else values)


def similarity(a: str | Question, b: str | Question) -> float:
    """Cosine of the two questions' embeddings; 0 when their gates differ."""
    qa = question(a) if isinstance(a, str) else a
    qb = question(b) if isinstance(b, str) else b
    if qa.gate != qb.gate:
        return 0.0
    common, ia, ib = np.intersect1d(qa.indices, qb.indices, assume_unique=True, return_indices=True)
    return float(np.dot(qa.values[ia], qb.values[ib])) if len(common) else 0.0


def single_turn(
    messages: Sequence[dict[str, str]], max_tokens: int | None, temperature: float | None
) -> tuple[str, str] | None:
    """(context digest, question) of a call the semantic cache may answer, else None: system
    messages and exactly one user message, the last."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user" or messages[-1] is not turns[0]:
        return None
    context = {
        "system": [m["content"] for m in messages if m["role"] == "system"],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    return hashlib.sha256(orjson.dumps(context)).hexdigest()[:32], turns[0]["content"]


def with_question(messages: Sequence[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``messages`` (single-turn) asking ``text`` instead: the earlier call a match names."""
    return [m if m["role"] == "system" else {"role": "user", "content": text} for m in messages]


@dataclass(frozen=True)
class SemanticHit(CallRecord):
    """A ``cached`` call answered through a semantic match: the result says ``cached:
    "semantic"`` and the similarity; the ledger stores it as any cached call."""

    similarity: float = field(default=0.0, compare=False)
    matched: str = field(default="", compare=False)

    @classmethod
    def of(cls, record: CallRecord, similarity: float, matched: str) -> SemanticHit:
        base = {f.name: getattr(record, f.name) for f in fields(CallRecord)}
        return cls(**base, similarity=similarity, matched=matched)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        for extra in ("ended_ns", "similarity", "matched"):
            del data[extra]
        return data


# KEYS[1] index (zset), KEYS[2] its sequence. ARGV[1] the mirror's sequence. Returns {sequence,
# reset (1: the index is older than the mirror, e.g. Redis was wiped), member, score, …}.
_SINCE = """
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[1])
local reset = 0
if seq < since then since = 0; reset = 1 end
local out = {seq, reset}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. since, '+inf', 'WITHSCORES')
for i = 1, #rows do out[#out + 1] = rows[i] end
return out
"""
# KEYS[1] index, KEYS[2] sequence. ARGV: member, size, TTL (s). A question already there keeps
# its place (NX): the index holds each question once.
_ADD = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return seq
"""


@dataclass
class _Mirror:
    """One index as this process last read it. The sparse matrix covers the first ``base`` rows;
    newer ones are scored apart until ``TAIL`` of them gather, so a batch that adds a question per
    query does not rebuild a 2,000-row matrix per lookup (about 5 ms each).
    Old rows are dropped in steps of ``TAIL`` for the same reason."""

    seq: int = 0
    texts: list[str] = field(default_factory=list)
    gates: list[tuple[str, ...]] = field(default_factory=list)
    rows: list[Question] = field(default_factory=list)
    matrix: Any = None
    base: int = 0

    def extend(self, items: list[tuple[str, int]], size: int) -> None:
        for text, _seq in items:
            q = question(text)
            self.texts.append(text)
            self.gates.append(q.gate)
            self.rows.append(q)
        if len(self.texts) > size + TAIL:
            cut = len(self.texts) - size
            del self.texts[:cut], self.gates[:cut], self.rows[:cut]
            self.matrix, self.base = None, 0

    def scores(self, q: Question) -> np.ndarray:
        if self.matrix is None or len(self.rows) - self.base >= TAIL:
            self.matrix, self.base = _csr(self.rows), len(self.rows)
        # The question as a dense vector in a scratch array (4 MB, set and cleared around the
        # product): CSR times a dense vector is 0.05 ms over 2,000 rows, CSR times a sparse one
        # 1 ms (it builds a 2^20-entry index pointer).
        with _SCRATCH_LOCK:
            _SCRATCH[q.indices] = q.values
            try:
                scores = self.matrix @ _SCRATCH
                if self.base < len(self.rows):
                    scores = np.concatenate([scores, _csr(self.rows[self.base :]) @ _SCRATCH])
            finally:
                _SCRATCH[q.indices] = 0.0
        return np.asarray(scores)


_SCRATCH = np.zeros(DIM, dtype=np.float32)
_SCRATCH_LOCK = threading.Lock()


def _csr(rows: Sequence[Question]) -> Any:
    data = np.concatenate([r.values for r in rows]) if rows else np.zeros(0, np.float32)
    cols = np.concatenate([r.indices for r in rows]) if rows else np.zeros(0, np.int64)
    indptr = np.cumsum([0] + [len(r.indices) for r in rows])
    return sparse.csr_matrix((data, cols, indptr), shape=(len(rows), DIM))


class SemanticIndex:
    """The questions each tenant's stage 1 calls answered, by context, for ``match``."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        ttl_s: int = 7 * 24 * 3600,
        size: int = INDEX_SIZE,
    ):
        self._client = client
        self._ns = namespace
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.size = size
        self._since = client.register_script(_SINCE)
        self._add = client.register_script(_ADD)
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()

    async def match(self, tenant_id: str, context: str, text: str) -> list[tuple[str, float]]:
        """Earlier questions of the tenant and context at or above the threshold, best first
        (at most ``CANDIDATES``); [] when there is none or Redis failed."""
        index = keys.semantic_index(self._ns, tenant_id, context)
        mirror = self._mirrors.pop(index, None) or _Mirror()
        self._mirrors[index] = mirror
        while len(self._mirrors) > MIRRORS:
            self._mirrors.popitem(last=False)
        try:
            reply = await self._since(keys=[index, keys.semantic_sequence(index)], args=[mirror.seq])
        except redis.RedisError as exc:
            log.warning("the semantic cache is unavailable (%s)", type(exc).__name__)
            return []
        seq, reset, rows = int(reply[0]), int(reply[1]), reply[2:]
        if reset:
            mirror = self._mirrors[index] = _Mirror()
        mirror.seq = seq
        fresh = [(_text(rows[i]), int(float(rows[i + 1]))) for i in range(0, len(rows), 2)]
        mirror.extend(fresh, self.size)
        if not mirror.rows:
            return []
        q = question(text)
        scores = mirror.scores(q)
        found = []
        for i in np.argsort(-scores)[: CANDIDATES * 4]:
            score = float(scores[i])
            if score < self.threshold:
                break
            if mirror.gates[i] == q.gate:
                found.append((mirror.texts[i], round(score, 4)))
                if len(found) == CANDIDATES:
                    break
        return found

    async def add(self, tenant_id: str, context: str, text: str) -> None:
        """Remember that ``text`` was answered in ``context`` (its answers are in the exact cache)."""
        index = keys.semantic_index(self._ns, tenant_id, context)
        try:
            await self._add(keys=[index, keys.semantic_sequence(index)], args=[text, self.size, self.ttl_s])
        except redis.RedisError as exc:
            log.warning("indexing a question failed (%s)", type(exc).__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


PARAPHRASES = Path(__file__).parent / "cache_data" / "paraphrases.jsonl"


@dataclass(frozen=True)
class Calibration:
    """How a threshold does on a labelled set: paraphrases it matches, negatives it matches."""

    threshold: float
    paraphrases: int
    hits: int
    negatives: int
    false_hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.paraphrases if self.paraphrases else 0.0

    @property
    def false_positive_rate(self) -> float:
        return self.false_hits / self.negatives if self.negatives else 0.0


def load_pairs(path: Path = PARAPHRASES) -> list[dict[str, str]]:
    """The labelled pairs: ``a``, ``b``, ``label`` (``paraphrase`` or ``negative``), ``kind``."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def calibrate(pairs: Sequence[dict[str, str]], threshold: float) -> Calibration:
    scored = [(p["label"], similarity(p["a"], p["b"]) >= threshold) for p in pairs]
    return Calibration(
        threshold,
        paraphrases=sum(label == "paraphrase" for label, _ in scored),
        hits=sum(label == "paraphrase" and hit for label, hit in scored),
        negatives=sum(label == "negative" for label, _ in scored),
        false_hits=sum(label == "negative" and hit for label, hit in scored),
    )
