"""Provider configurations stored through the admin API, with secrets encrypted at rest.

Secrets are encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under
``PROVIDER_SECRETS_KEY``: a comma-separated list of keys, newest first. The newest encrypts;
every key in the list still decrypts, so keys rotate without a migration (``rotate`` rewrites
stored secrets under the newest key). Secret values never leave this module except to build
providers: the API sees field names only.

Every change bumps a version number in Redis; each worker's ``ProviderManager`` watches it and
rebuilds its providers when it moves (hot swap).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, assert_never, cast

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, Field, SecretStr

from services.errors import NotFound, ServiceError
from services.payment_store import RedisClient, store_errors


class SecretsKeyMissing(ServiceError):
    status = 503
    code = "secrets_key_missing"
    title = "PROVIDER_SECRETS_KEY is not set, so secrets cannot be stored"


class SecretsUndecryptable(ServiceError):
    status = 503
    code = "secrets_undecryptable"
    title = "Stored provider secrets cannot be decrypted with the configured keys"


class ProviderConfigNotFound(NotFound):
    code = "provider_config_not_found"
    title = "Provider configuration not found"


class ProviderConfigExists(ServiceError):
    status = 409
    code = "provider_config_exists"
    title = "This provider already has a stored configuration; change it with PATCH"


class StoredProviderConfig(BaseModel):
    """A stored configuration as the admin API shows it: secrets by name only."""

    id: str
    provider_key: str
    service_type: str
    config: dict[str, Any]
    config_secret: dict[str, str] = Field(description="Secret field names, values masked")
    capabilities: list[str] | None = None
    active: bool
    created_at: datetime
    updated_at: datetime


class RoutingConfig(BaseModel):
    """Run-time routing, overriding PAYMENT_PROVIDER and PAYMENT_FALLBACK when stored."""

    default: str | None = None
    fallback: list[str] | None = None
    weights: dict[str, int] | None = Field(
        default=None, description="Split new payments between providers, sticky per customer"
    )


MASK = "********"


class SecretsProblem(StrEnum):
    """Why this process cannot read stored secrets."""

    KEY_MISSING = "secrets_key_missing"
    KEY_WRONG = "secrets_undecryptable"


@dataclass(frozen=True, slots=True)
class UnreadableConfigs:
    """Stored configurations whose secrets this process cannot decrypt, and why."""

    problem: SecretsProblem
    providers: tuple[str, ...]  # their provider keys, sorted

    @property
    def reason(self) -> str:
        match self.problem:
            case SecretsProblem.KEY_MISSING:
                key = "PROVIDER_SECRETS_KEY is unset"
            case SecretsProblem.KEY_WRONG:
                key = "PROVIDER_SECRETS_KEY is wrong (none of its keys decrypts them)"
            case _:
                assert_never(self.problem)
        held = "its provider" if len(self.providers) == 1 else "their providers"
        return (
            f"stored provider configs cannot be decrypted: {key}; {len(self.providers)} "
            f"config{'' if len(self.providers) == 1 else 's'} ignored and {held} held out "
            f"({', '.join(self.providers)})"
        )


@dataclass(frozen=True, slots=True)
class StoredProvider:
    """One readable stored configuration, as providers are built from it."""

    active: bool
    config: dict[str, Any]
    secrets: dict[str, str]


@dataclass(frozen=True, slots=True)
class StoredLayer:
    """What the stored configurations put over the environment's settings."""

    providers: dict[str, StoredProvider] = field(default_factory=dict)
    unreadable: UnreadableConfigs | None = None


@dataclass(frozen=True, slots=True)
class ProviderModels:
    """What one provider is built from: instances of its config and secret models, each None
    where the environment and the stored configuration together do not complete it."""

    config: BaseModel | None
    secrets: BaseModel | None


class StoredConfigInvalid(Exception):
    """A stored configuration that, over the environment's, does not fit its provider's
    models (stored by another release, or written around the admin API). Its provider is
    held out, never run on the environment's values alone."""

    def __init__(self, provider: str, fields: tuple[str, ...]) -> None:
        self.provider = provider
        self.fields = fields  # "config.x" / "config_secret.y": names, never values
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return (
            f"the stored configuration of {self.provider} does not fit it "
            f"({', '.join(self.fields)}); the provider is held out"
        )


class SecretBox:
    def __init__(self, keys: str | None) -> None:
        names = [key.strip() for key in (keys or "").split(",") if key.strip()]
        self._fernet = MultiFernet([Fernet(key.encode()) for key in names]) if names else None

    @property
    def available(self) -> bool:
        return self._fernet is not None

    def encrypt(self, values: Mapping[str, str]) -> str:
        if self._fernet is None:
            raise SecretsKeyMissing("Set PROVIDER_SECRETS_KEY (see `payments secrets-key`)")
        return self._fernet.encrypt(json.dumps(dict(values)).encode()).decode()

    def decrypt(self, token: str) -> dict[str, str]:
        if self._fernet is None:
            raise SecretsKeyMissing("Set PROVIDER_SECRETS_KEY to read stored secrets")
        try:
            return cast(dict[str, str], json.loads(self._fernet.decrypt(token.encode())))
        except InvalidToken as error:
            raise SecretsUndecryptable() from error

    def rotate(self, token: str) -> str:
        if self._fernet is None:
            raise SecretsKeyMissing()
        return self._fernet.rotate(token.encode()).decode()


def secret_values(model: BaseModel) -> dict[str, str]:
    """The plain values of a validated secrets model, for encryption."""
    values: dict[str, str] = {}
    for name, value in model:
        if value is None:
            continue
        values[name] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return values


NOT_HEADER_SAFE = "Must be printable ASCII: provider secrets travel in HTTP headers"


def unsendable_secrets(model: BaseModel) -> list[str]:
    """The fields of a validated secrets model whose value is not printable ASCII. Every
    provider secret is sent in an HTTP header (a bearer token, a basic-auth pair) or checked
    against one, which carry ASCII only: any other value (a pasted placeholder with a "…")
    could only fail at the provider's first call, as an encoding error."""
    return [
        name
        for name, value in secret_values(model).items()
        if not all(" " <= char <= "~" for char in value)
    ]


class ProviderConfigStore:
    def __init__(self, redis: RedisClient, *, prefix: str, box: SecretBox) -> None:
        self.redis = redis
        self.prefix = prefix
        self._redis = redis
        self._configs = f"{prefix}provider_configs"
        self._routing = f"{prefix}provider_routing"
        # A change and its version bump are one MULTI, which a Redis Cluster keeps to one slot:
        # so each of the two keys has a counter of its own, hash-tagged with that key's whole
        # name (a key without braces hashes whole), and the keys keep the names they had.
        self._configs_version = f"{{{self._configs}}}:version"
        self._routing_version = f"{{{self._routing}}}:version"
        self._box = box

    async def version(self) -> int:
        """Moves with every change of a configuration or of the routing: the sum of their
        counters, which only grow."""
        async with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._configs_version)
            pipe.get(self._routing_version)
            counts = await pipe.execute()
        return sum(int(count or 0) for count in counts)

    async def _all_raw(self) -> dict[str, dict[str, Any]]:
        async with store_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(self._configs))
        return {config_id: json.loads(value) for config_id, value in raw.items()}

    async def _write(self, config_id: str, data: Mapping[str, Any] | None) -> None:
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            if data is None:
                pipe.hdel(self._configs, config_id)
            else:
                pipe.hset(self._configs, config_id, json.dumps(dict(data)))
            pipe.incr(self._configs_version)
            await pipe.execute()

    @staticmethod
    def _public(data: Mapping[str, Any]) -> StoredProviderConfig:
        return StoredProviderConfig(
            id=data["id"],
            provider_key=data["provider_key"],
            service_type=data["service_type"],
            config=data["config"],
            config_secret={name: MASK for name in data.get("secret_fields", [])},
            capabilities=data.get("capabilities"),
            active=data["active"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
        )

    async def all(self) -> list[StoredProviderConfig]:
        configs = [self._public(data) for data in (await self._all_raw()).values()]
        return sorted(configs, key=lambda config: config.created_at)

    async def get(self, config_id: str) -> StoredProviderConfig:
        return self._public(await self._get_raw(config_id))

    async def _get_raw(self, config_id: str) -> dict[str, Any]:
        async with store_errors():
            raw = await self._redis.hget(self._configs, config_id)
        if raw is None:
            raise ProviderConfigNotFound(f"No provider configuration {config_id!r}")
        return cast(dict[str, Any], json.loads(raw))

    async def create(
        self,
        *,
        provider_key: str,
        service_type: str,
        config: Mapping[str, Any],
        secrets_: Mapping[str, str],
        capabilities: list[str] | None,
        active: bool = True,
    ) -> StoredProviderConfig:
        existing = await self._all_raw()
        if any(data["provider_key"] == provider_key for data in existing.values()):
            raise ProviderConfigExists(f"{provider_key} already has a stored configuration")
        now = datetime.now(UTC).isoformat()
        config_id = f"pc_{secrets.token_hex(8)}"
        data: dict[str, Any] = {
            "id": config_id,
            "provider_key": provider_key,
            "service_type": service_type,
            "config": dict(config),
            "secret_fields": sorted(secrets_),
            "secrets": self._box.encrypt(secrets_) if secrets_ else None,
            "capabilities": capabilities,
            "active": active,
            "created_at": now,
            "updated_at": now,
        }
        await self._write(config_id, data)
        return self._public(data)

    async def update(
        self,
        config_id: str,
        *,
        config: Mapping[str, Any] | None = None,
        secrets_: Mapping[str, str] | None = None,
        capabilities: list[str] | None = None,
        active: bool | None = None,
    ) -> StoredProviderConfig:
        data = await self._get_raw(config_id)
        if config is not None:
            data["config"] = dict(config)
        if secrets_ is not None:
            data["secret_fields"] = sorted(secrets_)
            data["secrets"] = self._box.encrypt(secrets_) if secrets_ else None
        if capabilities is not None:
            data["capabilities"] = capabilities
        if active is not None:
            data["active"] = active
        data["updated_at"] = datetime.now(UTC).isoformat()
        await self._write(config_id, data)
        return self._public(data)

    async def delete(self, config_id: str) -> None:
        await self._get_raw(config_id)
        await self._write(config_id, None)

    async def current_secrets(self, config_id: str) -> dict[str, str]:
        data = await self._get_raw(config_id)
        return self._box.decrypt(data["secrets"]) if data.get("secrets") else {}

    async def load_for_build(self) -> StoredLayer:
        """Every stored configuration with its secrets decrypted, to build providers; those
        whose secrets do not decrypt are left out and named, never dropped silently."""
        readable: dict[str, StoredProvider] = {}
        unreadable: list[str] = []
        problem = SecretsProblem.KEY_MISSING
        for data in (await self._all_raw()).values():
            try:
                decrypted = self._box.decrypt(data["secrets"]) if data.get("secrets") else {}
            except SecretsKeyMissing:
                unreadable.append(data["provider_key"])
                continue
            except SecretsUndecryptable:
                problem = SecretsProblem.KEY_WRONG
                unreadable.append(data["provider_key"])
                continue
            readable[data["provider_key"]] = StoredProvider(
                active=bool(data["active"]), config=data["config"], secrets=decrypted
            )
        return StoredLayer(
            providers=readable,
            unreadable=UnreadableConfigs(problem, tuple(sorted(unreadable)))
            if unreadable
            else None,
        )

    async def rotate_secrets(self) -> int:
        """Re-encrypt every stored secret under the newest key; returns how many."""
        count = 0
        for config_id, data in (await self._all_raw()).items():
            if data.get("secrets"):
                data["secrets"] = self._box.rotate(data["secrets"])
                await self._write(config_id, data)
                count += 1
        return count

    async def routing(self) -> RoutingConfig:
        async with store_errors():
            raw = await self._redis.get(self._routing)
        return RoutingConfig.model_validate_json(raw) if raw else RoutingConfig()

    async def set_routing(self, routing: RoutingConfig) -> RoutingConfig:
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._routing, routing.model_dump_json(exclude_none=True))
            pipe.incr(self._routing_version)
            await pipe.execute()
        return routing
