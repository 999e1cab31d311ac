"""What the admin dashboard's pages show and what its forms do.

Every change goes through the same services as the admin API (``ProviderAdmin`` for routing
and stored configurations, ``PaymentOperations`` for refunds): a form is only another way of
writing the API's request. Forms arrive as strings; they are read into the API's own request
models here, and bad input is ``InvalidForm`` (400), never a 500.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from models.payment import (
    PAYMENT_ID_PATTERN,
    HistoryEntry,
    PaymentRecord,
    PaymentStatus,
    RefundListResponse,
    RefundRequest,
)
from models.user import User
from services.errors import PaymentNotFound, ServiceError
from services.provider_admin import (
    AdminHealth,
    ProviderConfigIn,
    ProviderConfigPatch,
    ProviderInfo,
    ReconciliationStats,
)
from services.provider_configs import MASK, RoutingConfig, StoredProviderConfig
from services.refunds import RefundAnswer

if TYPE_CHECKING:
    from services.operations import PaymentOperations
    from services.payment_store import PaymentStore
    from services.provider_admin import ProviderAdmin

PAGE_SIZE = 25
# A search reads at most this many index entries a page: a filter that matches little (a rare
# status over every payment) answers a page with "more" rather than walk the whole index.
MAX_EXAMINED = 500
READ_BATCH = 100
BACKLOG_SHOWN = 50

_NAME = re.compile(r"^[a-z0-9_\-]{1,64}$")
_CURSOR = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?):([A-Za-z0-9_\-]{3,128})$")


class InvalidForm(ServiceError):
    status = 400
    code = "invalid_form"
    title = "The form has invalid fields"


# -- payments ------------------------------------------------------------------------------


class PaymentSearch(BaseModel):
    """A search of payments: by ID alone, or by any of owner, status and provider."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    payment_id: Annotated[str, StringConstraints(pattern=PAYMENT_ID_PATTERN)] | None = None
    user: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    status: PaymentStatus | None = None
    provider: Annotated[str, StringConstraints(pattern=_NAME.pattern)] | None = None
    cursor: Annotated[str, StringConstraints(pattern=_CURSOR.pattern)] | None = None

    @classmethod
    def of_form(cls, values: dict[str, str]) -> PaymentSearch:
        """From the search form's query string: empty fields are no filter."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v.strip()})
        except ValidationError as error:
            raise InvalidForm(_fields_in(error)) from None

    @property
    def empty(self) -> bool:
        return not (self.payment_id or self.user or self.status or self.provider)

    def matches(self, record: PaymentRecord) -> bool:
        return (
            (self.user is None or record.owner == self.user)
            and (self.status is None or record.status is self.status)
            and (self.provider is None or record.provider == self.provider)
        )

    def after(self) -> tuple[float, str] | None:
        match = _CURSOR.fullmatch(self.cursor or "")
        return (float(match[1]), match[2]) if match else None


@dataclass(frozen=True, slots=True)
class SearchPage:
    items: list[PaymentRecord]
    next_cursor: str | None  # more may match: ask again from here
    examined: int


@dataclass(frozen=True, slots=True)
class PaymentDetail:
    record: PaymentRecord
    transitions: list[HistoryEntry]
    refunds: RefundListResponse
    refundable: int  # minor units that may still be refunded
    refund_form_key: str  # a fresh Idempotency-Key for this rendering of the refund form


# -- stored configurations -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigField:
    name: str
    required: bool
    secret: bool
    description: str | None
    value: str = ""  # the stored value (never a secret's)
    json: bool = False  # not a plain value (an object, a list): typed as JSON


@dataclass(frozen=True, slots=True)
class ConfigForm:
    provider: str
    fields: list[ConfigField]
    capabilities: list[str]
    stored: StoredProviderConfig | None = None


# -- reconciliation and merchant webhooks ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class BacklogEntry:
    payment_id: str
    due_at: datetime
    step: int


@dataclass(frozen=True, slots=True)
class ReconciliationView:
    stats: ReconciliationStats
    backlog: list[BacklogEntry]


class MerchantWebhooks(Protocol):
    """The merchant events service (services/events) as the dashboard's webhooks page reads
    it: the endpoints, and each one's latest deliveries."""

    async def list_endpoints(self) -> list[Any]: ...

    async def delivery_log(self, endpoint_id: str, *, limit: int = 100) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class Overview:
    providers: list[ProviderInfo]
    health: AdminHealth
    routing: RoutingConfig


@dataclass(slots=True)
class RoutingForm:
    """The routing form as typed: a default, a fallback list, "name=weight" lines."""

    default: str = ""
    fallback: str = ""
    weights: str = ""
    force: bool = False
    errors: list[str] = field(default_factory=list)

    def routing(self) -> RoutingConfig:
        default = self.default.strip() or None
        fallback = [name.strip() for name in self.fallback.split(",") if name.strip()]
        weights: dict[str, int] = {}
        for line in self.weights.replace(",", "\n").splitlines():
            if not line.strip():
                continue
            name, sep, weight = line.partition("=")
            name = name.strip()
            if not sep or not _NAME.fullmatch(name) or not weight.strip().isdigit():
                raise InvalidForm("Weights are lines of provider=weight, e.g. stripe=80")
            weights[name] = int(weight.strip())
        for name in [default or "", *fallback]:
            if name and not _NAME.fullmatch(name):
                raise InvalidForm("Provider names are lowercase letters, digits, - and _")
        return RoutingConfig(default=default, fallback=fallback or None, weights=weights or None)

    @classmethod
    def of(cls, routing: RoutingConfig) -> RoutingForm:
        return cls(
            default=routing.default or "",
            fallback=", ".join(routing.fallback or []),
            weights="\n".join(
                f"{name}={weight}" for name, weight in (routing.weights or {}).items()
            ),
        )


class AdminViews:
    def __init__(
        self,
        admin: ProviderAdmin,
        store: PaymentStore,
        operations: PaymentOperations,
        *,
        webhooks: MerchantWebhooks | None = None,
    ) -> None:
        self._admin = admin
        self._store = store
        self._operations = operations
        self.webhooks = webhooks

    # -- providers and routing ---------------------------------------------------------------

    async def overview(self) -> Overview:
        """Every provider with its health and breaker, and the routing in force."""
        return Overview(
            providers=await self._admin.providers(),
            health=await self._admin.health(),
            routing=self._admin.routing(),
        )

    def routing_form(self) -> RoutingForm:
        return RoutingForm.of(self._admin.routing())

    async def provider_names(self) -> list[str]:
        return [provider.name for provider in await self._admin.providers()]

    async def set_routing(self, form: RoutingForm) -> RoutingConfig:
        """What PUT /api/v1/providers/routing does, from the form."""
        return await self._admin.set_routing(form.routing(), force=form.force)

    # -- stored configurations ---------------------------------------------------------------

    async def configs(self) -> list[StoredProviderConfig]:
        return await self._admin.configs()

    async def config_form(
        self, provider: str | None = None, config_id: str | None = None
    ) -> ConfigForm:
        """The fields a stored configuration of ``provider`` (or of the stored one) may have,
        filled in with the stored values; secrets never are."""
        stored = await self._admin.config(config_id) if config_id else None
        key = stored.provider_key if stored else (provider or "")
        schema = self._admin.schema(key)
        fields = _schema_fields(schema.config, secret=False, values=stored.config if stored else {})
        fields += _schema_fields(schema.config_secret, secret=True, values={})
        return ConfigForm(schema.provider, fields, schema.capabilities, stored)

    async def create_config(
        self, provider: str, form: dict[str, str], *, active: bool
    ) -> StoredProviderConfig:
        """What POST /api/v1/providers/configs does, from the form: empty fields are unset."""
        spec = await self.config_form(provider)
        config, secrets_ = _split(spec, form)
        try:
            body = ProviderConfigIn(
                provider_key=spec.provider, config=config, config_secret=secrets_, active=active
            )
        except ValidationError as error:
            raise InvalidForm(_fields_in(error)) from None
        return await self._admin.create_config(body)

    async def update_config(self, config_id: str, form: dict[str, str]) -> StoredProviderConfig:
        """What PATCH does, from the form: the settings as given, secrets left empty keep
        their stored values."""
        spec = await self.config_form(config_id=config_id)
        config, secrets_ = _split(spec, form)
        return await self._admin.update_config(
            config_id, ProviderConfigPatch(config=config, config_secret=secrets_ or None)
        )

    async def set_active(self, config_id: str, *, active: bool) -> StoredProviderConfig:
        return await self._admin.update_config(config_id, ProviderConfigPatch(active=active))

    # -- payments ----------------------------------------------------------------------------

    async def search(self, query: PaymentSearch) -> SearchPage:
        """Newest first. By ID: that payment. Otherwise one index (the owner's, else the
        provider's, else every payment's), each payment read from the store and kept if it
        matches: the index only orders and narrows, the record decides."""
        if query.payment_id is not None:
            record = await self._store.get(query.payment_id)
            found = [record] if record is not None and query.matches(record) else []
            return SearchPage(found, None, 1)
        if query.user is not None:
            key = self._store.payment_index_key(owner=query.user)
        else:
            key = self._store.payment_index_key(provider=query.provider)
        items: list[PaymentRecord] = []
        after, examined = query.after(), 0
        while len(items) < PAGE_SIZE and examined < MAX_EXAMINED:
            batch = await self._store.indexed_payments(
                key, before=after, limit=min(READ_BATCH, MAX_EXAMINED - examined)
            )
            if not batch:
                return SearchPage(items, None, examined)
            for (payment_id, created), record in zip(
                batch,
                await self._store.get_many([payment_id for payment_id, _ in batch]),
                strict=True,
            ):
                examined += 1
                after = (created, payment_id)
                if record is not None and query.matches(record):
                    items.append(record)
                    if len(items) == PAGE_SIZE:
                        break
        return SearchPage(items, f"{after[0]!r}:{after[1]}" if after else None, examined)

    async def payment(self, payment_id: str, admin: User) -> PaymentDetail:
        if not re.fullmatch(PAYMENT_ID_PATTERN, payment_id):
            raise PaymentNotFound("No such payment")
        record = await self._store.get(payment_id)
        if record is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        refunds = await self._operations.refunds(payment_id, admin)
        taken = record.amount_captured if record.amount_captured is not None else record.amount
        refundable = (
            taken - record.amount_refunded - record.amount_pending_refund
            if record.status.is_paid
            else 0
        )
        return PaymentDetail(
            record=record,
            transitions=await self._store.history(payment_id),
            refunds=refunds,
            refundable=max(0, refundable),
            refund_form_key=f"admin-ui-{secrets.token_urlsafe(18)}",
        )

    async def refund(
        self, payment_id: str, admin: User, *, amount: str, reason: str, idempotency_key: str
    ) -> RefundAnswer:
        """What POST /api/v1/payment/{id}/refund does, from the form. The form carries its
        own Idempotency-Key, made when it was rendered: sent twice (a double click, a
        reload), it refunds once."""
        if not re.fullmatch(PAYMENT_ID_PATTERN, payment_id):
            raise PaymentNotFound("No such payment")
        if not re.fullmatch(r"^admin-ui-[A-Za-z0-9_\-]{24}$", idempotency_key):
            raise InvalidForm("Reload the payment and send the refund form again")
        amount = amount.strip()
        if amount and not amount.isdigit():
            raise InvalidForm("The amount is a whole number of minor units (cents), or empty")
        try:
            body = RefundRequest(
                amount=int(amount) if amount else None, reason=reason.strip() or None
            )
        except ValidationError as error:
            raise InvalidForm(_fields_in(error)) from None
        return await self._operations.refund(
            payment_id, body, user=admin, idempotency_key=idempotency_key
        )

    # -- reconciliation ----------------------------------------------------------------------

    async def reconciliation(self) -> ReconciliationView:
        backlog = await self._store.reconcile_backlog(limit=BACKLOG_SHOWN)
        return ReconciliationView(
            stats=await self._admin.reconciliation(),
            backlog=[
                BacklogEntry(payment_id, datetime.fromtimestamp(due, UTC), step)
                for payment_id, due, step in backlog
            ],
        )


_PLAIN_TYPES = frozenset({"string", "integer", "number", "boolean", "null"})


def _is_plain(spec: dict[str, Any]) -> bool:
    """A field one input box holds: a string, a number, a flag (or one of them or null)."""
    if "anyOf" in spec:
        return all(_is_plain(option) for option in spec["anyOf"])
    return spec.get("type") in _PLAIN_TYPES


def _schema_fields(
    schema: dict[str, Any], *, secret: bool, values: dict[str, Any]
) -> list[ConfigField]:
    required = set(schema.get("required", []))
    fields = []
    for name, spec in schema.get("properties", {}).items():
        if spec.get("readOnly"):  # set only in the environment, never stored
            continue
        plain = _is_plain(spec)
        value = values.get(name)
        shown = "" if secret or value is None else str(value) if plain else json.dumps(value)
        fields.append(
            ConfigField(
                name=name,
                required=name in required,
                secret=secret,
                description=spec.get("description"),
                value=shown,
                json=not plain,
            )
        )
    return fields


def _split(spec: ConfigForm, form: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The form's non-empty settings and secrets (a masked value is no new secret)."""
    config: dict[str, Any] = {}
    secrets_: dict[str, Any] = {}
    for item in spec.fields:
        text = form.get(("secret:" if item.secret else "config:") + item.name, "").strip()
        if not text or text == MASK:
            continue
        value: Any = text
        if item.json:
            try:
                value = json.loads(text)
            except ValueError:
                raise InvalidForm(f"{item.name} must be JSON") from None
        (secrets_ if item.secret else config)[item.name] = value
    return config, secrets_


def _fields_in(error: ValidationError) -> str:
    names = sorted({".".join(map(str, item["loc"])) or "form" for item in error.errors()})
    return f"Invalid fields: {', '.join(names)}"
