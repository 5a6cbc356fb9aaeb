"""``providers.toml`` (SPEC §4.1): parsing, errors that name the key, prices, the simulated default."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.providers.config import (
    Catalog,
    ConfigError,
    CouncilPreset,
    ModelConfig,
    ProviderConfig,
    load_catalog,
    parse_catalog,
    simulated_catalog,
    split_model_id,
)

# SPEC §4.1's example, plus the two provider tables its fallbacks and members refer to.
SPEC_EXAMPLE = """
[providers.openai]
api = "openai"                      # wire format: openai | anthropic | gemini
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
timeout_s = 60
max_concurrency = 64                # optional: per worker process
rpm = 500                           # optional: shared by all workers of the deployment
tpm = 200000                        # optional

[providers.anthropic]
api = "anthropic"
base_url = "https://api.anthropic.com/"
api_key_env = "ANTHROPIC_API_KEY"

[providers.google]
api = "gemini"
base_url = "https://generativelanguage.googleapis.com"
api_key_env = "GEMINI_API_KEY"
timeout_s = 90

[models."openai:gpt-4o-mini"]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60
fallbacks = ["anthropic:claude-3-5-haiku-latest"]   # optional

[council]
members = ["openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest", "google:gemini-2.0-flash"]
chairman = "openai:gpt-4o"
"""
SIM_URL = "http://127.0.0.1:8900"


def spec_data() -> dict[str, Any]:
    return tomllib.loads(SPEC_EXAMPLE)


def minimal(**council: Any) -> dict[str, Any]:
    return {
        "providers": {"openai": {"api": "openai", "base_url": "https://api.openai.com/v1"}},
        "council": council or {"members": ["openai:gpt-4o-mini"], "chairman": "openai:gpt-4o"},
    }


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_catalog(data)
    return str(info.value)


# -- parsing ------------------------------------------------------------------------------------


def test_spec_example_parses() -> None:
    catalog = parse_catalog(spec_data())

    assert catalog.providers["openai"] == ProviderConfig(
        name="openai",
        api="openai",
        base_url="https://api.openai.com/v1",
        api_key_env="OPENAI_API_KEY",
        timeout_s=60.0,
        max_concurrency=64,
        rpm=500,
        tpm=200000,
    )
    assert catalog.members == (
        "openai:gpt-4o-mini",
        "anthropic:claude-3-5-haiku-latest",
        "google:gemini-2.0-flash",
    )
    assert catalog.chairman == "openai:gpt-4o"
    assert catalog.models["openai:gpt-4o-mini"] == ModelConfig(
        id="openai:gpt-4o-mini",
        input_usd_per_mtok=0.15,
        output_usd_per_mtok=0.60,
        fallbacks=("anthropic:claude-3-5-haiku-latest",),
    )
    assert not catalog.simulated


def test_optional_provider_keys_take_defaults_and_base_url_loses_trailing_slash() -> None:
    catalog = parse_catalog(spec_data())

    anthropic = catalog.providers["anthropic"]
    assert anthropic.base_url == "https://api.anthropic.com"
    assert anthropic.timeout_s == 60.0
    assert anthropic.max_concurrency == 64
    assert anthropic.rpm is None
    assert anthropic.tpm is None
    assert catalog.providers["google"].timeout_s == 90.0


def test_chairman_defaults_to_first_member() -> None:
    catalog = parse_catalog(minimal(members=["openai:gpt-4o-mini", "openai:gpt-4o"]))

    assert catalog.chairman == "openai:gpt-4o-mini"


def test_model_name_may_contain_colons() -> None:
    data = minimal(members=["openai:ft:gpt-4o-mini:acme::abc123"])

    catalog = parse_catalog(data)

    assert split_model_id(catalog.members[0]) == ("openai", "ft:gpt-4o-mini:acme::abc123")


# -- errors name the key ------------------------------------------------------------------------


def test_unknown_api_names_the_provider_key() -> None:
    data = spec_data()
    data["providers"]["google"]["api"] = "vertex"

    message = config_error(data)

    assert "providers.google.api" in message
    assert "vertex" in message


def test_missing_api_names_the_provider_key() -> None:
    data = spec_data()
    del data["providers"]["anthropic"]["api"]

    assert "providers.anthropic.api" in config_error(data)


def test_missing_base_url_names_the_provider_key() -> None:
    data = spec_data()
    del data["providers"]["openai"]["base_url"]

    assert "providers.openai.base_url" in config_error(data)


def test_no_providers_is_an_error() -> None:
    data = spec_data()
    del data["providers"]

    assert "providers" in config_error(data)


def test_council_member_with_unknown_provider_names_the_key() -> None:
    data = spec_data()
    data["council"]["members"].append("mistral:mistral-large-latest")

    message = config_error(data)

    assert "council.members" in message
    assert "mistral" in message


def test_chairman_with_unknown_provider_names_the_key() -> None:
    data = spec_data()
    data["council"]["chairman"] = "mistral:mistral-large-latest"

    message = config_error(data)

    assert "council.chairman" in message
    assert "mistral" in message


def test_fallback_with_unknown_provider_names_the_key() -> None:
    data = spec_data()
    data["models"]["openai:gpt-4o-mini"]["fallbacks"] = ["mistral:mistral-small"]

    message = config_error(data)

    assert "fallbacks" in message
    assert "mistral" in message


def test_member_without_provider_prefix_is_an_error() -> None:
    data = spec_data()
    data["council"]["members"] = ["gpt-4o-mini", "openai:gpt-4o"]

    message = config_error(data)

    assert "gpt-4o-mini" in message
    assert "provider:model" in message


def test_empty_members_is_an_error() -> None:
    data = spec_data()
    data["council"]["members"] = []

    assert "members" in config_error(data)


def test_missing_council_reports_missing_members() -> None:
    data = spec_data()
    del data["council"]

    message = config_error(data)

    assert "members" in message


# -- prices -------------------------------------------------------------------------------------


def test_model_cost_is_tokens_times_price_per_million() -> None:
    model = parse_catalog(spec_data()).model("openai:gpt-4o-mini")

    assert model.cost(1_000_000, 0) == pytest.approx(0.15)
    assert model.cost(0, 1_000_000) == pytest.approx(0.60)
    assert model.cost(1000, 500) == pytest.approx((1000 * 0.15 + 500 * 0.60) / 1e6)
    assert model.cost(0, 0) == 0


def test_model_without_a_table_costs_nothing_and_has_no_fallbacks() -> None:
    catalog = parse_catalog(spec_data())

    chairman = catalog.model("openai:gpt-4o")

    assert chairman == ModelConfig(id="openai:gpt-4o")
    assert chairman.cost(123_456, 654_321) == 0
    assert chairman.fallbacks == ()
    assert catalog.model("openai:gpt-4o") is chairman


def test_partial_price_table_defaults_missing_price_to_zero() -> None:
    data = spec_data()
    data["models"]["openai:gpt-4o"] = {"output_usd_per_mtok": 10}

    model = parse_catalog(data).model("openai:gpt-4o")

    assert model.cost(1_000_000, 1_000_000) == pytest.approx(10.0)


# -- check_model --------------------------------------------------------------------------------


def test_check_model_accepts_configured_provider() -> None:
    catalog = parse_catalog(spec_data())

    assert catalog.check_model("openai:gpt-4o") is None
    assert catalog.check_model("google:gemini-2.5-pro") is None


@pytest.mark.parametrize("model_id", ["gpt-4o", ":gpt-4o", "openai:", ""])
def test_check_model_rejects_malformed_ids(model_id: str) -> None:
    problem = parse_catalog(spec_data()).check_model(model_id)

    assert problem == f"model id must look like 'provider:model', got {model_id!r}"


def test_check_model_names_unknown_provider_and_the_configured_ones() -> None:
    problem = parse_catalog(spec_data()).check_model("mistral:large")

    assert problem == "unknown provider 'mistral' (configured: anthropic, google, openai)"


# -- simulated default --------------------------------------------------------------------------


def test_simulated_catalog_is_one_openai_compatible_provider() -> None:
    catalog = simulated_catalog(SIM_URL + "/")

    assert catalog.simulated
    assert list(catalog.providers) == ["sim"]
    sim = catalog.providers["sim"]
    assert sim.api == "openai"
    assert sim.base_url == "http://127.0.0.1:8900/v1"
    assert sim.api_key_env is None
    assert catalog.members == ("sim:alpha", "sim:beta", "sim:gamma")
    assert catalog.chairman == "sim:chairman"
    for model_id in (*catalog.members, catalog.chairman):
        assert catalog.check_model(model_id) is None
        assert catalog.model(model_id).cost(1000, 1000) == 0


def test_load_catalog_without_file_is_simulated(tmp_path: Path) -> None:
    catalog = load_catalog(tmp_path / "providers.toml", SIM_URL)

    assert catalog == simulated_catalog(SIM_URL)
    assert catalog.simulated


def test_load_catalog_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(SPEC_EXAMPLE)

    catalog = load_catalog(path, SIM_URL)

    assert isinstance(catalog, Catalog)
    assert not catalog.simulated
    assert catalog == parse_catalog(spec_data())


def test_load_catalog_with_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text("[providers.openai\napi = 'openai'\n")

    with pytest.raises(ConfigError) as info:
        load_catalog(path, SIM_URL)

    assert str(path) in str(info.value)


# -- the file's shape: every bad field is named -------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key", "value", "named"),
    [
        ("openai", "timeout_s", 0, "providers.openai.timeout_s"),
        ("openai", "max_concurrency", 0, "providers.openai.max_concurrency"),
        ("openai", "rpm", "many", "providers.openai.rpm"),
        ("openai", "tpm", -5, "providers.openai.tpm"),
        ("anthropic", "breaker_failures", 0, "providers.anthropic.breaker_failures"),
        ("google", "breaker_cooldown_s", -1, "providers.google.breaker_cooldown_s"),
        ("google", "base_url", "", "providers.google.base_url"),
    ],
)
def test_out_of_range_provider_value_names_the_key_and_the_value(
    table: str, key: str, value: Any, named: str
) -> None:
    data = spec_data()
    data["providers"][table][key] = value

    message = config_error(data)

    assert message.startswith(named)
    assert repr(value) in message


def test_misspelt_provider_key_is_named_rather_than_ignored() -> None:
    data = spec_data()
    data["providers"]["openai"]["rmp"] = 500

    assert config_error(data) == "providers.openai.rmp is not a known key"


def test_provider_that_is_not_a_table_is_named() -> None:
    data = spec_data()
    data["providers"]["mistral"] = "https://api.mistral.ai"

    assert config_error(data) == "providers.mistral must be a table"


def test_negative_price_names_the_quoted_model_key() -> None:
    data = spec_data()
    data["models"]["openai:gpt-4o-mini"]["input_usd_per_mtok"] = -0.15

    assert config_error(data).startswith('models."openai:gpt-4o-mini".input_usd_per_mtok:')


def test_fallbacks_that_are_not_a_list_name_the_key() -> None:
    data = spec_data()
    data["models"]["openai:gpt-4o-mini"]["fallbacks"] = "openai:gpt-4o"

    assert config_error(data).startswith('models."openai:gpt-4o-mini".fallbacks:')


def test_every_bad_field_is_reported_at_once() -> None:
    data = spec_data()
    data["providers"]["openai"]["timeout_s"] = 0
    del data["providers"]["google"]["api"]

    message = config_error(data)

    assert "providers.openai.timeout_s" in message
    assert "providers.google.api is required" in message


def test_repeated_council_member_is_an_error() -> None:
    data = spec_data()
    data["council"]["members"] = ["openai:gpt-4o-mini", "openai:gpt-4o-mini"]

    assert config_error(data) == "council.members must be distinct; named more than once: openai:gpt-4o-mini"


# -- [councils.<name>] presets (SPEC §11) -------------------------------------------------------

PRESETS = """
[councils.fast]
members = ["openai:gpt-4o-mini", "google:gemini-2.0-flash"]
chairman = "openai:gpt-4o-mini"
mode = "single"

[councils.deep]
members = ["openai:gpt-4o", "anthropic:claude-3-5-sonnet-latest", "google:gemini-2.5-pro"]
chairman = "anthropic:claude-3-5-sonnet-latest"
"""


def preset_data() -> dict[str, Any]:
    return tomllib.loads(SPEC_EXAMPLE + PRESETS)


def test_council_presets_parse_with_mode_defaulting_to_council() -> None:
    catalog = parse_catalog(preset_data())

    assert catalog.councils == {
        "fast": CouncilPreset(
            name="fast",
            members=("openai:gpt-4o-mini", "google:gemini-2.0-flash"),
            chairman="openai:gpt-4o-mini",
            mode="single",
        ),
        "deep": CouncilPreset(
            name="deep",
            members=("openai:gpt-4o", "anthropic:claude-3-5-sonnet-latest", "google:gemini-2.5-pro"),
            chairman="anthropic:claude-3-5-sonnet-latest",
            mode="council",
        ),
    }


def test_no_presets_is_an_empty_mapping() -> None:
    assert parse_catalog(spec_data()).councils == {}
    assert simulated_catalog(SIM_URL).councils == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"members": ["openai:gpt-4o", "mistral:large"]},
            "councils.deep.members[1]: unknown provider 'mistral' (configured: anthropic, google, openai)",
        ),
        (
            {"chairman": "gpt-4o"},
            "councils.deep.chairman: model id must look like 'provider:model', got 'gpt-4o'",
        ),
        (
            {"members": ["openai:gpt-4o", "openai:gpt-4o"]},
            "councils.deep.members must be distinct; named more than once: openai:gpt-4o",
        ),
        ({"mode": "fast"}, "councils.deep.mode: input should be 'council', 'single' or 'auto', got 'fast'"),
        (
            {"members": []},
            "councils.deep.members: list should have at least 1 item after validation, not 0, got []",
        ),
        ({"chairman": None}, "councils.deep.chairman is required"),
        ({"chair": "openai:gpt-4o"}, "councils.deep.chair is not a known key"),
    ],
)
def test_bad_preset_field_is_named(change: dict[str, Any], message: str) -> None:
    data = preset_data()
    table = data["councils"]["deep"]
    for key, value in change.items():
        if value is None:
            del table[key]
        else:
            table[key] = value

    assert config_error(data) == message


def test_preset_name_that_needs_quotes_is_quoted() -> None:
    data = preset_data()
    data["councils"]["v1.5"] = {"members": ["openai:gpt-4o"], "chairman": "mistral:large"}

    assert config_error(data).startswith('councils."v1.5".chairman: unknown provider')


# -- resolve_model ------------------------------------------------------------------------------


def test_resolve_model_keeps_a_full_id_of_a_configured_provider() -> None:
    catalog = parse_catalog(preset_data())

    assert catalog.resolve_model("openai:gpt-4o-mini") == "openai:gpt-4o-mini"
    assert catalog.resolve_model("openai:ft:gpt-4o-mini:acme::abc123") == "openai:ft:gpt-4o-mini:acme::abc123"


def test_resolve_model_finds_a_bare_name_the_configuration_names_once() -> None:
    catalog = parse_catalog(preset_data())

    assert catalog.resolve_model("gpt-4o-mini") == "openai:gpt-4o-mini"  # [models] table and members
    assert catalog.resolve_model("claude-3-5-haiku-latest") == "anthropic:claude-3-5-haiku-latest"  # fallback
    assert catalog.resolve_model("gpt-4o") == "openai:gpt-4o"  # chairman only
    assert catalog.resolve_model("gemini-2.5-pro") == "google:gemini-2.5-pro"  # a preset member only


def test_resolve_model_refuses_unknown_and_ambiguous_names() -> None:
    data = preset_data()
    data["providers"]["azure"] = {"api": "openai", "base_url": "https://example.openai.azure.com"}
    data["models"]["azure:gpt-4o-mini"] = {"input_usd_per_mtok": 0.15}
    catalog = parse_catalog(data)

    assert catalog.resolve_model("gpt-4o-mini") is None  # openai and azure both name it
    assert catalog.resolve_model("gpt-5") is None
    assert catalog.resolve_model("mistral:large") is None
    assert catalog.resolve_model("openai:") is None
    assert catalog.resolve_model("") is None


def test_resolve_model_on_the_simulated_catalog() -> None:
    catalog = simulated_catalog(SIM_URL)

    assert catalog.resolve_model("alpha") == "sim:alpha"
    assert catalog.resolve_model("sim:chairman") == "sim:chairman"
    assert catalog.resolve_model("delta") is None


# -- domain routing rules -----------------------------------------------------------------------


def test_domain_rules_parse_in_file_order() -> None:
    data = spec_data()
    data["routing"] = {
        "domains": {
            "medical": {"keywords": ["patient", "dosage"], "members": ["anthropic:claude-3-5-haiku-latest"]},
            "code": {"keywords": ["python"], "members": ["openai:gpt-4o-mini", "google:gemini-2.0-flash"]},
        }
    }
    catalog = parse_catalog(data)
    assert [(r.name, r.keywords, r.members) for r in catalog.domains] == [
        ("medical", ("patient", "dosage"), ("anthropic:claude-3-5-haiku-latest",)),
        ("code", ("python",), ("openai:gpt-4o-mini", "google:gemini-2.0-flash")),
    ]


def test_a_domain_rule_naming_an_unknown_provider_or_no_keyword_is_refused() -> None:
    data = spec_data()
    data["routing"] = {"domains": {"law": {"keywords": ["contract"], "members": ["nowhere:model"]}}}
    assert "routing.domains.law.members[0]" in config_error(data)
    data["routing"] = {"domains": {"law": {"keywords": [" "], "members": ["openai:gpt-4o"]}}}
    assert "routing.domains.law.keywords" in config_error(data)
    data["routing"] = {"domains": {"law": {"keywords": ["tax"], "members": ["openai:gpt-4o"], "typo": 1}}}
    assert "routing.domains.law.typo" in config_error(data)
