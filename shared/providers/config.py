"""Provider and model configuration (SPEC §4.1, §11): ``providers.toml`` or the built-in simulated provider.

A model id is ``<provider table key>:<model name>``; the part after the first colon is sent to
the provider. A model without a ``[models."…"]`` table costs nothing and has no fallbacks.

The file's shape (tables, keys, types, ranges) is a set of pydantic models; what needs the whole
file (a member, chairman or fallback naming a configured provider, distinct members) is checked
after, in :func:`parse_catalog`. Either way a ``ConfigError`` names the key in TOML's own
spelling (``providers.google.api``, ``models."openai:gpt-4o".fallbacks[0]``), so an operator can
find the line. The rest of the code sees only the frozen dataclasses below, never the models.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

WIRE_FORMATS = ("openai", "anthropic", "gemini")
SIMULATED_PROVIDER = "sim"
COUNCIL_MODES = ("council", "single", "auto")


class ConfigError(ValueError):
    """``providers.toml`` is unusable; the message names the offending key."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    api: str
    base_url: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_concurrency: int = 64
    rpm: int | None = None
    tpm: int | None = None
    breaker_failures: int = 10
    breaker_cooldown_s: float = 15.0


@dataclass(frozen=True)
class ModelConfig:
    id: str
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    fallbacks: tuple[str, ...] = ()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1e6


@dataclass(frozen=True)
class CouncilPreset:
    """A named ``[councils.<name>]`` table, picked by ``model: "council:<name>"`` (SPEC §11)."""

    name: str
    members: tuple[str, ...]
    chairman: str
    mode: str = "council"


@dataclass(frozen=True)
class DomainRule:
    """A ``[routing.domains.<name>]`` table: queries that name one of its ``keywords`` are answered
    by its ``members`` under ``mode: "auto"`` (SPEC §13)."""

    name: str
    keywords: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    members: tuple[str, ...]
    chairman: str
    simulated: bool = False
    councils: dict[str, CouncilPreset] = field(default_factory=dict)
    domains: tuple[DomainRule, ...] = ()  # in the file's order: the first that matches routes
    _unknown: dict[str, ModelConfig] = field(default_factory=dict, compare=False, repr=False)

    def model(self, model_id: str) -> ModelConfig:
        found = self.models.get(model_id)
        if found is None:
            found = self._unknown.setdefault(model_id, ModelConfig(id=model_id))
        return found

    def check_model(self, model_id: str) -> str | None:
        """Why ``model_id`` cannot be used, or None when it can."""
        provider, sep, name = model_id.partition(":")
        if not sep or not provider or not name:
            return f"model id must look like 'provider:model', got {model_id!r}"
        if provider not in self.providers:
            known = ", ".join(sorted(self.providers))
            return f"unknown provider {provider!r} (configured: {known})"
        return None

    def named_models(self) -> set[str]:
        """Every model id the configuration names: price tables, fallbacks, councils and presets."""
        named = set(self.models) | set(self.members) | {self.chairman}
        named.update(f for m in self.models.values() for f in m.fallbacks)
        for preset in self.councils.values():
            named.update(preset.members)
            named.add(preset.chairman)
        return named

    def resolve_model(self, name: str) -> str | None:
        """The model id ``name`` stands for, or None when it stands for none or for several.

        A full id (``openai:gpt-4o``) of a configured provider is itself, as council members are
        (SPEC §11: "a model id"); a bare name (``gpt-4o-mini``) is the one model the configuration
        names with that model name, and None when two providers both name it.
        """
        provider, sep, _ = name.partition(":")
        if sep and provider in self.providers:
            return name if self.check_model(name) is None else None
        matches = [m for m in self.named_models() if split_model_id(m)[1] == name]
        return matches[0] if len(matches) == 1 else None


def split_model_id(model_id: str) -> tuple[str, str]:
    provider, _, name = model_id.partition(":")
    return provider, name


def simulated_catalog(sim_url: str) -> Catalog:
    """The built-in configuration used when no providers file exists: everything is simulated."""
    sim = ProviderConfig(
        name=SIMULATED_PROVIDER,
        api="openai",
        base_url=sim_url.rstrip("/") + "/v1",
        timeout_s=60.0,
        max_concurrency=1024,
    )
    members = ("sim:alpha", "sim:beta", "sim:gamma")
    models = {m: ModelConfig(id=m) for m in (*members, "sim:chairman")}
    return Catalog(
        providers={SIMULATED_PROVIDER: sim},
        models=models,
        members=members,
        chairman="sim:chairman",
        simulated=True,
    )


def load_catalog(path: Path, sim_url: str) -> Catalog:
    if not path.exists():
        return simulated_catalog(sim_url)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_catalog(data)


def parse_catalog(data: dict[str, Any]) -> Catalog:
    try:
        file = _ProvidersFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(error) for error in exc.errors())) from None
    catalog = Catalog(
        providers={name: table.config(name) for name, table in file.providers.items()},
        models={model_id: table.config(model_id) for model_id, table in file.models.items()},
        members=tuple(file.council.members),
        chairman=file.council.chairman or file.council.members[0],
        councils={name: table.preset(name) for name, table in file.councils.items()},
        domains=tuple(table.rule(name) for name, table in file.routing.domains.items()),
    )
    _check_references(catalog)
    return catalog


# ------------------------------------------------------------------ the file's shape


class _Table(BaseModel):
    # A misspelt key (``rmp = 500``) would otherwise silently drop a limit.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ProviderTable(_Table):
    api: Literal["openai", "anthropic", "gemini"]
    base_url: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, min_length=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=64, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    breaker_failures: int = Field(default=10, ge=1)
    breaker_cooldown_s: float = Field(default=15.0, gt=0)

    def config(self, name: str) -> ProviderConfig:
        return ProviderConfig(
            name=name, **self.model_dump(exclude={"base_url"}), base_url=self.base_url.rstrip("/")
        )


class _ModelTable(_Table):
    input_usd_per_mtok: float = Field(default=0.0, ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    fallbacks: list[str] = Field(default_factory=list)

    def config(self, model_id: str) -> ModelConfig:
        return ModelConfig(
            id=model_id,
            input_usd_per_mtok=self.input_usd_per_mtok,
            output_usd_per_mtok=self.output_usd_per_mtok,
            fallbacks=tuple(self.fallbacks),
        )


class _CouncilTable(_Table):
    members: list[str] = Field(min_length=1)
    chairman: str | None = None  # the first member when omitted


class _PresetTable(_Table):
    members: list[str] = Field(min_length=1)
    chairman: str
    mode: Literal["council", "single", "auto"] = "council"

    def preset(self, name: str) -> CouncilPreset:
        return CouncilPreset(name=name, members=tuple(self.members), chairman=self.chairman, mode=self.mode)


class _DomainTable(_Table):
    keywords: list[str] = Field(min_length=1)
    members: list[str] = Field(min_length=1)

    def rule(self, name: str) -> DomainRule:
        return DomainRule(
            name=name,
            keywords=tuple(k.strip() for k in self.keywords if k.strip()),
            members=tuple(self.members),
        )


class _RoutingTable(_Table):
    domains: dict[str, _DomainTable] = Field(default_factory=dict)


class _ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    providers: dict[str, _ProviderTable] = Field(min_length=1)
    models: dict[str, _ModelTable] = Field(default_factory=dict)
    # Validated even when absent, so a file without [council] says "council.members is required".
    council: _CouncilTable = Field(default_factory=dict, validate_default=True)
    councils: dict[str, _PresetTable] = Field(default_factory=dict)
    routing: _RoutingTable = Field(default_factory=_RoutingTable)


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known key",
    "model_type": "must be a table",
    "dict_type": "must be a table",
}


def _describe(error: Any) -> str:
    """One pydantic error as ``<TOML key>: <problem>``."""
    where = _toml_key(error["loc"])
    kind = error["type"]
    if error["loc"] == ("providers",) and kind in ("missing", "too_short"):
        return "no [providers.*] table"
    if kind in _MESSAGES:
        return f"{where} {_MESSAGES[kind]}"
    return f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"


def _toml_key(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part.replace("_", "").replace("-", "").isalnum():
            parts.append(f".{part}" if parts else part)
        else:
            parts.append(f'."{part}"' if parts else f'"{part}"')
    return "".join(parts)


# ------------------------------------------------------------------ what needs the whole file


def _check_references(catalog: Catalog) -> None:
    councils = [("council", catalog.members, catalog.chairman)]
    councils += [
        (f"councils.{_toml_key((p.name,))}", p.members, p.chairman) for p in catalog.councils.values()
    ]
    checks: list[tuple[str, str]] = []
    for rule in catalog.domains:
        key = f"routing.domains.{_toml_key((rule.name,))}"
        if not rule.keywords:
            raise ConfigError(f"{key}.keywords must name at least one non-empty keyword")
        checks += [(f"{key}.members[{i}]", m) for i, m in enumerate(rule.members)]
    for key, members, chairman in councils:
        twice = sorted(m for m, n in Counter(members).items() if n > 1)
        if twice:
            raise ConfigError(f"{key}.members must be distinct; named more than once: {', '.join(twice)}")
        checks += [(f"{key}.members[{i}]", m) for i, m in enumerate(members)]
        checks.append((f"{key}.chairman", chairman))
    checks.extend(
        (f"models.{_toml_key((m.id,))}.fallbacks[{i}]", f)
        for m in catalog.models.values()
        for i, f in enumerate(m.fallbacks)
    )
    for key, model_id in checks:
        problem = catalog.check_model(model_id)
        if problem:
            raise ConfigError(f"{key}: {problem}")
