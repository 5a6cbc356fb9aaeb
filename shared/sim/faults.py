"""What the simulated provider does wrong, and how slowly: ``SimConfig`` and the per-request plan.

Owns the configuration (validated on every construction and runtime merge), the list of error
kinds, and ``plan_call``, which draws one request's latency, fault and ranking mess from the
server's RNG. It does not know about wire formats (``wire.py`` renders each kind as the real API
would) nor what the answer says (``answers.py``).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

# The SPEC §4.2 taxonomy as a provider can produce it (``network`` is the client's own failure).
ERROR_KINDS = (
    "rate_limited",
    "overloaded",
    "server",
    "timeout",
    "bad_response",
    "empty",
    "auth",
    "invalid_request",
    "content_filter",
)
MESSY_KINDS = ("duplicate", "missing", "no_ranking")
# Fields a ``models`` entry may override for one model name.
MODEL_OVERRIDABLE = (
    "latency_ms",
    "latency_jitter_ms",
    "error_rate",
    "error_kinds",
    "hang_s",
    "messy_ranking_rate",
    "first_position_bias",
)


@dataclass
class SimConfig:
    """Behaviour of the simulated provider; every field can be changed at runtime (``POST /_sim/config``).

    A running server works on its own validated copy, so mutating an instance after handing it to
    ``create_app`` changes nothing: send a patch to ``/_sim/config`` instead.
    """

    latency_ms: float = 0
    latency_jitter_ms: float = 0
    error_rate: float = 0
    error_kinds: list[str] = field(default_factory=lambda: ["server"])
    # How long a ``timeout`` fault hangs before answering; longer than any client timeout.
    hang_s: float = 120
    # Wait hint sent with ``rate_limited`` (retry-after, retry-after-ms, x-ratelimit-reset-requests).
    retry_after_s: float = 1
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    messy_ranking_rate: float = 0
    # What reviews prefer, so analytics tests know the truth (0 and {} change nothing):
    # ``preferred_models`` maps a model name to the probability that a review showing its answer
    # ranks that answer first; ``first_position_bias`` is the probability that a review ranks the
    # answer shown first (Response A) first, whatever it says (a position-biased reviewer).
    preferred_models: dict[str, float] = field(default_factory=dict)
    first_position_bias: float = 0
    seed: int | None = None
    log_limit: int = 200_000
    log_file: str | None = None

    def __post_init__(self) -> None:
        # Coerce as well as check, so a JSON patch like {"latency_ms": 5} or {"seed": "7"} is taken
        # at face value and nonsense is refused before it reaches a request.
        for name in ("latency_ms", "latency_jitter_ms", "hang_s", "retry_after_s"):
            _set(self, name, _non_negative(name, getattr(self, name)))
        for name in ("error_rate", "messy_ranking_rate", "first_position_bias"):
            _set(self, name, _probability(name, getattr(self, name)))
        _set(self, "error_kinds", _error_kinds("error_kinds", self.error_kinds))
        if self.seed is not None:
            _set(self, "seed", int(self.seed))
        if int(self.log_limit) < 1:
            raise ValueError("log_limit must be at least 1")
        _set(self, "log_limit", int(self.log_limit))
        if self.log_file is not None:
            _set(self, "log_file", str(self.log_file))
        if not isinstance(self.models, dict):
            raise ValueError("models must be an object of model name -> overrides")
        _set(self, "models", {str(m): _model_overrides(str(m), o) for m, o in self.models.items()})
        if not isinstance(self.preferred_models, dict):
            raise ValueError("preferred_models must be an object of model name -> probability")
        _set(
            self,
            "preferred_models",
            {str(m): _probability(f"preferred_models[{m!r}]", p) for m, p in self.preferred_models.items()},
        )

    def merged(self, patch: dict[str, Any]) -> SimConfig:
        """A new config with ``patch``'s top-level fields replaced (``models`` is replaced whole)."""
        unknown = set(patch) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **patch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_model(self, model: str) -> ModelBehaviour:
        override = self.models.get(model, {})
        return ModelBehaviour(
            latency_ms=override.get("latency_ms", self.latency_ms),
            latency_jitter_ms=override.get("latency_jitter_ms", self.latency_jitter_ms),
            error_rate=override.get("error_rate", self.error_rate),
            error_kinds=override.get("error_kinds", self.error_kinds),
            hang_s=override.get("hang_s", self.hang_s),
            messy_ranking_rate=override.get("messy_ranking_rate", self.messy_ranking_rate),
            first_position_bias=override.get("first_position_bias", self.first_position_bias),
        )


@dataclass(frozen=True, slots=True)
class ModelBehaviour:
    """The config as it applies to one model, after its ``models`` override."""

    latency_ms: float
    latency_jitter_ms: float
    error_rate: float
    error_kinds: list[str]
    hang_s: float
    messy_ranking_rate: float
    first_position_bias: float = 0


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What one request will do: ``outcome`` is "ok" or an error kind; ``messy`` a MESSY_KINDS entry."""

    outcome: str
    delay_s: float
    messy: str | None


def plan_call(behaviour: ModelBehaviour, rng: random.Random, *, review: bool) -> CallPlan:
    """Draw one request's fate.

    Always consumes the same five draws, so with a seed the n-th request gets the same plan
    whatever the earlier ones turned out to be.
    """
    fault_roll, kind_roll, jitter_roll, messy_roll, messy_kind_roll = (rng.random() for _ in range(5))
    outcome = "ok"
    if fault_roll < behaviour.error_rate:
        kinds = behaviour.error_kinds
        outcome = kinds[min(int(kind_roll * len(kinds)), len(kinds) - 1)]
    if outcome == "timeout":
        delay_s = behaviour.hang_s
    else:
        jitter = behaviour.latency_jitter_ms * (2 * jitter_roll - 1)
        delay_s = max(0.0, behaviour.latency_ms + jitter) / 1000
    messy = None
    if review and outcome == "ok" and messy_roll < behaviour.messy_ranking_rate:
        messy = MESSY_KINDS[min(int(messy_kind_roll * len(MESSY_KINDS)), len(MESSY_KINDS) - 1)]
    return CallPlan(outcome=outcome, delay_s=delay_s, messy=messy)


def _set(config: SimConfig, name: str, value: Any) -> None:
    setattr(config, name, value)


def _non_negative(name: str, value: Any) -> float:
    number = float(value)
    if not number >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0")
    return number


def _probability(name: str, value: Any) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError(f"{name} must be between 0 and 1")
    return number


def _error_kinds(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{name} must be a non-empty list of {list(ERROR_KINDS)}")
    unknown = [kind for kind in value if kind not in ERROR_KINDS]
    if unknown:
        raise ValueError(f"{name}: unknown error kinds {unknown}; known: {list(ERROR_KINDS)}")
    return list(value)


def _model_overrides(model: str, overrides: Any) -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise ValueError(f"models[{model!r}] must be an object")
    unknown = set(overrides) - set(MODEL_OVERRIDABLE)
    if unknown:
        raise ValueError(
            f"models[{model!r}]: cannot override {sorted(unknown)}; only {list(MODEL_OVERRIDABLE)}"
        )
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        label = f"models[{model!r}].{key}"
        if key in ("error_rate", "messy_ranking_rate", "first_position_bias"):
            checked[key] = _probability(label, value)
        elif key == "error_kinds":
            checked[key] = _error_kinds(label, value)
        else:
            checked[key] = _non_negative(label, value)
    return checked
