"""The merchant's webhook endpoints: where events go, which ones, signed with which secret.

Each endpoint is one hash (``whep:{id}``) with its deliveries beside it in the same slot
(services/events/deliveries.py), and its ID in one index set. The signing secret is
``whsec_`` + base64 of 32 random bytes, as the Standard Webhooks specification has it; it is
shown once, when made, and kept encrypted with PROVIDER_SECRETS_KEY (the provider configs'
``SecretBox``, so one key, one rotation procedure). Rotating keeps the previous secret for an
overlap period, during which every delivery carries both signatures.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, cast

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.errors import NotFound, ServiceError
from services.events.outbox import EventType
from services.events.urls import MAX_URL_LENGTH, UrlGuard
from services.payment_store import RedisClient, store_errors
from services.provider_configs import SecretBox

ENDPOINT_ID_PATTERN = r"^we_[0-9a-f]{16}$"
MAX_ENDPOINTS = 100
SECRET_BYTES = 32


class WebhookEndpointNotFound(NotFound):
    code = "webhook_endpoint_not_found"
    title = "Webhook endpoint not found"


class TooManyWebhookEndpoints(ServiceError):
    status = 409
    code = "too_many_webhook_endpoints"
    title = "Too many webhook endpoints"


class EndpointStatus(StrEnum):
    ACTIVE = "active"
    FAILING = "failing"  # a delivery ran out of retries; the next success clears it


Description = Annotated[str, StringConstraints(max_length=500)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH)]
EventTypes = Annotated[list[EventType], Field(max_length=len(EventType))]


class WebhookEndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    event_types: EventTypes | None = Field(
        default=None, description="The events to send; none or null: every event"
    )
    description: Description = ""
    enabled: bool = True


class WebhookEndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    event_types: EventTypes | None = None
    description: Description | None = None
    enabled: bool | None = None


class WebhookEndpoint(BaseModel):
    id: str
    url: str
    event_types: list[EventType] | None
    description: str
    enabled: bool
    status: EndpointStatus
    failing_since: datetime | None = None
    created_at: datetime
    updated_at: datetime

    def wants(self, event_type: str) -> bool:
        return self.enabled and (not self.event_types or event_type in self.event_types)


class WebhookEndpointCreated(WebhookEndpoint):
    secret: str = Field(description="whsec_...: shown this once; verify deliveries with it")


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: int = Field(
        default=86_400,
        ge=0,
        le=7 * 86_400,
        description="How long deliveries are signed with the old secret too",
    )


class RotatedSecret(BaseModel):
    secret: str = Field(description="The new whsec_ secret: shown this once")
    previous_expires_at: datetime | None


# KEYS: an endpoint's hash. ARGV: its secrets as read, the same re-encrypted. Writes them only
# if no one changed them meanwhile (a rotate-secret call), so that a new secret is never lost.
_REENCRYPT_LUA = """
if redis.call('HGET', KEYS[1], 'secrets') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'secrets', ARGV[2])
return 1
"""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _now() -> datetime:
    return datetime.now(UTC)


class EndpointStore:
    def __init__(self, redis: RedisClient, *, prefix: str, box: SecretBox, guard: UrlGuard) -> None:
        self._redis = redis
        self._prefix = prefix
        self._box = box
        self._guard = guard
        self._index = f"{prefix}whep:{{index}}"
        self._reencrypt = redis.register_script(_REENCRYPT_LUA)

    def key(self, endpoint_id: str) -> str:
        """The endpoint's hash; its deliveries' keys start with it (one slot)."""
        return f"{self._prefix}whep:{{{endpoint_id}}}"

    async def create(self, body: WebhookEndpointIn) -> WebhookEndpointCreated:
        await self._guard.resolve(body.url)
        now = _now()
        endpoint_id = f"we_{secrets.token_hex(8)}"
        secret = new_secret()
        fields: dict[str, str] = {
            "id": endpoint_id,
            "url": body.url,
            "event_types": _types_field(body.event_types),
            "description": body.description,
            "enabled": "1" if body.enabled else "0",
            "status": str(EndpointStatus.ACTIVE),
            "created_at": now.isoformat(),
            "updated_at": now.isoformat(),
            "secrets": self._box.encrypt({"current": secret}),
        }
        async with store_errors():
            if await self._redis.scard(self._index) >= MAX_ENDPOINTS:
                raise TooManyWebhookEndpoints(f"At most {MAX_ENDPOINTS} webhook endpoints")
            await self._redis.hset(self.key(endpoint_id), items=_flat(fields))
            await self._redis.sadd(self._index, endpoint_id)
        shown = _endpoint(fields)
        return WebhookEndpointCreated(**shown.model_dump(), secret=secret)

    async def ids(self) -> list[str]:
        async with store_errors():
            members = await self._redis.smembers(self._index)
        return sorted(str(member) for member in members)

    async def all(self) -> list[WebhookEndpoint]:
        ids = await self.ids()
        if not ids:
            return []
        async with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for endpoint_id in ids:
                pipe.hgetall(self.key(endpoint_id))
            rows = cast(Sequence[dict[str, str]], await pipe.execute())
        found = [_endpoint(row) for row in rows if row]
        return sorted(found, key=lambda endpoint: (endpoint.created_at, endpoint.id))

    async def _fields(self, endpoint_id: str) -> dict[str, str]:
        async with store_errors():
            fields = cast(dict[str, str], await self._redis.hgetall(self.key(endpoint_id)))
        if not fields:
            raise WebhookEndpointNotFound(f"No webhook endpoint {endpoint_id!r}")
        return fields

    async def get(self, endpoint_id: str) -> WebhookEndpoint:
        return _endpoint(await self._fields(endpoint_id))

    async def update(self, endpoint_id: str, patch: WebhookEndpointPatch) -> WebhookEndpoint:
        await self._fields(endpoint_id)
        changes: dict[str, str] = {"updated_at": _now().isoformat()}
        given = patch.model_fields_set
        if patch.url is not None:
            await self._guard.resolve(patch.url)
            changes["url"] = patch.url
        if "event_types" in given:
            changes["event_types"] = _types_field(patch.event_types)
        if patch.description is not None:
            changes["description"] = patch.description
        if patch.enabled is not None:
            changes["enabled"] = "1" if patch.enabled else "0"
        async with store_errors():
            await self._redis.hset(self.key(endpoint_id), items=_flat(changes))
        return await self.get(endpoint_id)

    async def delete(self, endpoint_id: str) -> None:
        """Forget the endpoint; its queued deliveries are dropped as they come up, and the
        rest of its keys expire with the delivery log's retention."""
        await self._fields(endpoint_id)
        async with store_errors():
            await self._redis.delete(self.key(endpoint_id))
            await self._redis.srem(self._index, endpoint_id)

    async def rotate_secret(self, endpoint_id: str, rotation: SecretRotation) -> RotatedSecret:
        fields = await self._fields(endpoint_id)
        current = self._box.decrypt(fields["secrets"])["current"]
        secret = new_secret()
        values = {"current": secret}
        expires = None
        if rotation.overlap_seconds > 0:
            expires = _now() + timedelta(seconds=rotation.overlap_seconds)
            values |= {"previous": current, "previous_expires_at": expires.isoformat()}
        async with store_errors():
            await self._redis.hset(
                self.key(endpoint_id),
                mapping={"secrets": self._box.encrypt(values), "updated_at": _now().isoformat()},
            )
        return RotatedSecret(secret=secret, previous_expires_at=expires)

    async def reencrypt_secrets(self) -> int:
        """Re-encrypt every endpoint's signing secrets under PROVIDER_SECRETS_KEY's newest
        key (``payments secrets rotate``: the provider configs' and these, one procedure).
        Returns how many endpoints were re-encrypted."""
        count = 0
        for endpoint_id in await self.ids():
            key = self.key(endpoint_id)
            while True:
                async with store_errors():
                    token = await self._redis.hget(key, "secrets")
                if token is None:  # deleted meanwhile
                    break
                async with store_errors():
                    written = await self._reencrypt(
                        keys=[key], args=[token, self._box.rotate(str(token))]
                    )
                if written:
                    count += 1
                    break
        return count

    def signing_secrets(self, fields: dict[str, str], *, now: datetime) -> list[str]:
        """The secrets a delivery is signed with now: the current one, and the previous one
        while its overlap lasts."""
        values = self._box.decrypt(fields["secrets"])
        found = [values["current"]]
        expires = values.get("previous_expires_at")
        if "previous" in values and expires and datetime.fromisoformat(expires) > now:
            found.append(values["previous"])
        return found


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _types_field(types: list[EventType] | None) -> str:
    return json.dumps(sorted(set(types)) if types else None)


def _endpoint(fields: dict[str, str]) -> WebhookEndpoint:
    types = json.loads(fields.get("event_types") or "null")
    return WebhookEndpoint(
        id=fields["id"],
        url=fields["url"],
        event_types=types,
        description=fields.get("description", ""),
        enabled=fields.get("enabled") == "1",
        status=EndpointStatus(fields.get("status", EndpointStatus.ACTIVE)),
        failing_since=fields.get("failing_since") or None,
        created_at=fields["created_at"],
        updated_at=fields["updated_at"],
    )


def endpoint_from_fields(fields: dict[str, str]) -> WebhookEndpoint:
    return _endpoint(fields)
