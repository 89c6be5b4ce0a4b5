"""Configuration mistakes are startup errors that say what to change."""

from __future__ import annotations

import pytest

from jobcast.worker.settings import ConfigError, Settings

from .conftest import SECRET


def test_one_api_key_listed_for_two_tenants_refuses_to_start() -> None:
    """Refused when the settings are read, before anything starts (Settings.from_env for every command)."""
    with pytest.raises(ConfigError, match=r"JOBCAST_API_KEYS.*same key.*'acme'.*'globex'"):
        Settings(env="production", api_keys="acme:shared-key,globex:shared-key", secret_key=SECRET)


def test_one_tenant_may_list_several_keys() -> None:
    settings = Settings(env="production", api_keys="acme:key-1,acme:key-2", secret_key=SECRET)
    assert settings.tenant_keys == {"key-1": "acme", "key-2": "acme"}
