"""Provider and model configuration (SPEC §4.1): ``providers.toml`` or the built-in simulated provider.

A model id is ``<provider table key>:<model name>``; the part after the first colon is sent to
the provider. A model without a ``[models."…"]`` table costs nothing and has no fallbacks.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WIRE_FORMATS = ("openai", "anthropic", "gemini")
SIMULATED_PROVIDER = "sim"


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
class Catalog:
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    members: tuple[str, ...]
    chairman: str
    simulated: bool = False
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
    providers: dict[str, ProviderConfig] = {}
    for name, table in (data.get("providers") or {}).items():
        api = table.get("api")
        if api not in WIRE_FORMATS:
            raise ConfigError(f"providers.{name}.api must be one of {WIRE_FORMATS}, got {api!r}")
        if not table.get("base_url"):
            raise ConfigError(f"providers.{name}.base_url is required")
        providers[name] = ProviderConfig(
            name=name,
            api=api,
            base_url=str(table["base_url"]).rstrip("/"),
            api_key_env=table.get("api_key_env"),
            timeout_s=float(table.get("timeout_s", 60)),
            max_concurrency=int(table.get("max_concurrency", 64)),
            rpm=table.get("rpm"),
            tpm=table.get("tpm"),
            breaker_failures=int(table.get("breaker_failures", 10)),
            breaker_cooldown_s=float(table.get("breaker_cooldown_s", 15)),
        )
    if not providers:
        raise ConfigError("no [providers.*] table")
    models: dict[str, ModelConfig] = {}
    for model_id, table in (data.get("models") or {}).items():
        models[model_id] = ModelConfig(
            id=model_id,
            input_usd_per_mtok=float(table.get("input_usd_per_mtok", 0)),
            output_usd_per_mtok=float(table.get("output_usd_per_mtok", 0)),
            fallbacks=tuple(table.get("fallbacks", ())),
        )
    council = data.get("council") or {}
    members = tuple(council.get("members") or ())
    chairman = council.get("chairman") or (members[0] if members else "")
    if not members:
        raise ConfigError("council.members is required")
    catalog = Catalog(providers=providers, models=models, members=members, chairman=chairman)
    checks = [(f"council.members[{i}]", m) for i, m in enumerate(members)]
    checks.append(("council.chairman", chairman))
    checks.extend(
        (f'models."{m.id}".fallbacks[{i}]', f) for m in models.values() for i, f in enumerate(m.fallbacks)
    )
    for key, model_id in checks:
        problem = catalog.check_model(model_id)
        if problem:
            raise ConfigError(f"{key}: {problem}")
    return catalog
