"""Builds ``Provider`` objects from the catalog: one per ``[providers.X]`` table.

Provider keys are read from the environment variable the table names, once, here; they live
only inside the provider object and go out only in request headers.
"""

from __future__ import annotations

import os

from shared.providers.anthropic import AnthropicProvider
from shared.providers.base import Provider
from shared.providers.config import Catalog, ProviderConfig
from shared.providers.gemini import GeminiProvider
from shared.providers.openai import OpenAIProvider

_WIRE_FORMATS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}


def build_provider(config: ProviderConfig) -> Provider:
    cls = _WIRE_FORMATS.get(config.api)
    if cls is None:
        raise ValueError(f"wire format {config.api!r} is not available yet")
    key = os.environ.get(config.api_key_env) if config.api_key_env else None
    if config.name == "sim" and key is None:
        key = "simulated"
    return cls(config, key)


def build_providers(catalog: Catalog) -> dict[str, Provider]:
    return {name: build_provider(cfg) for name, cfg in catalog.providers.items()}
