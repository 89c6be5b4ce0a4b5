"""Configuration mistakes are startup errors that say what to change."""

from __future__ import annotations

import pytest

from jobcast.app import create_app
from jobcast.worker.settings import ConfigError, Settings

from .conftest import SECRET


def test_one_api_key_listed_for_two_tenants_refuses_to_start() -> None:
    settings = Settings(env="production", api_keys="acme:shared-key,globex:shared-key", secret_key=SECRET)
    with pytest.raises(ConfigError, match=r"JOBCAST_API_KEYS.*same key.*'acme'.*'globex'"):
        create_app(settings)


def test_one_tenant_may_list_several_keys() -> None:
    settings = Settings(env="production", api_keys="acme:key-1,acme:key-2", secret_key=SECRET)
    assert settings.tenant_keys == {"key-1": "acme", "key-2": "acme"}
