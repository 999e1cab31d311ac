"""The operators' side of the providers: what is there, their stored configurations, routing,
our IDs and theirs, reconciliation and health.

The admin routers parse, authorize and call this; it reaches the providers as the manager has
them now, the stored configurations, the store, the breakers and the reconciler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.payment import ProviderHealth, ProviderName, ServiceHealth
from services.errors import (
    NotFound,
    ReceiptStorageUnavailable,
    ServiceError,
    StoreUnavailable,
    UnknownProvider,
)
from services.payment_providers.base import (
    BasePaymentProvider,
    Capability,
    environment_only_fields,
)
from services.payment_providers.breaker import BreakerState
from services.payment_providers.placeholders import HeldOutProvider
from services.provider_configs import (
    NOT_HEADER_SAFE,
    RoutingConfig,
    SecretsProblem,
    StoredProviderConfig,
    UnreadableConfigs,
    secret_values,
    unsendable_secrets,
)

if TYPE_CHECKING:
    from services.payment_providers.guard import ProviderGuard
    from services.payment_store import PaymentStore
    from services.provider_configs import ProviderConfigStore
    from services.provider_manager import ProviderManager
    from services.reconciler import Reconciler

HEALTH_CHECK_TIMEOUT_S = 5.0


class InvalidProviderConfig(ServiceError):
    status = 422
    code = "invalid_provider_config"
    title = "The configuration does not fit the provider"


class RoutingToInactiveProvider(ServiceError):
    """Routing new payments to a provider that cannot take them would fail every payment."""

    status = 422
    code = "provider_not_configured"
    title = "The provider cannot take payments here"


# -- what the operators send and see -----------------------------------------------------------


class ProviderInfo(BaseModel):
    name: str
    display_name: str
    service_type: str
    id_prefixes: list[str]
    capabilities: list[str]
    configured: bool
    active: bool
    default: bool
    breaker: str


class ProviderSchema(BaseModel):
    provider: str
    config: dict[str, Any]
    config_secret: dict[str, Any]
    capabilities: list[str]


class ProviderConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider_key: ProviderName
    service_type: Literal["payment"] = "payment"
    config: dict[str, Any] = Field(default_factory=dict)
    config_secret: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[Capability] | None = None
    active: bool = True


class ProviderConfigPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = None
    config_secret: dict[str, Any] | None = None
    capabilities: list[Capability] | None = None
    active: bool | None = None


class MappingOut(BaseModel):
    provider: str
    entity: str
    local_id: str
    external_id: str


@dataclass(frozen=True, slots=True)
class LiveFigures:
    """What /metrics reads from Redis at each scrape: each provider's breaker state and the
    reconciliation backlog (shared by every worker, so no worker's memory has them)."""

    breakers: dict[str, str]
    queued: int
    due: int


class MappingIn(BaseModel):
    """One of our IDs and the provider's for the same thing: a plan and a Paddle price or a
    LemonSqueezy variant, say."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(pattern=r"^[a-z0-9_\-]{1,64}$")
    entity: str = Field(pattern=r"^[a-z_]{1,32}$")
    local_id: str = Field(min_length=1, max_length=256)
    external_id: str = Field(min_length=1, max_length=256)


class MappingPage(BaseModel):
    items: list[MappingOut]
    next_cursor: int | None


class ReconciliationStats(BaseModel):
    runs: int
    checked: int
    changed: int
    settled: int
    gave_up: int
    errors: int
    queued: int = Field(description="Payments waiting to be verified again")
    due: int = Field(description="Of those, the ones whose time has come")
    schedule_seconds: list[float]
    last_run_at: str | None
    last_run_ms: float | None
    leader: str | None = Field(description="The worker doing reconciliation now")
    this_worker: str


class StoredConfigsHealth(BaseModel):
    status: Literal["ok", "degraded"]
    problem: SecretsProblem | None = None
    reason: str | None = None
    held_out: list[str] = Field(
        default_factory=list, description="Providers whose stored configuration is unreadable"
    )

    @classmethod
    def of(cls, unreadable: UnreadableConfigs | None) -> StoredConfigsHealth:
        if unreadable is None:
            return cls(status="ok")
        return cls(
            status="degraded",
            problem=unreadable.problem,
            reason=unreadable.reason,
            held_out=list(unreadable.providers),
        )


class ReceiptsHealth(BaseModel):
    """Whether receipts and credit notes are signed (PAdES) on this service, and whether
    their directory takes files."""

    signing: Literal["signed", "unsigned"]
    message: str
    storage: str = "ok"  # or why RECEIPTS_DIR cannot be written

    @classmethod
    def of(cls, signed: bool, storage_problem: str | None = None) -> ReceiptsHealth:
        storage = storage_problem or "ok"
        if signed:
            return cls(
                signing="signed",
                message="PDFs are signed with RECEIPT_SIGNING_CERT",
                storage=storage,
            )
        return cls(
            signing="unsigned",
            message="RECEIPT_SIGNING_KEY and RECEIPT_SIGNING_CERT are not set: PDFs are unsigned",
            storage=storage,
        )


class AdminHealth(ServiceHealth):
    stored_configs: StoredConfigsHealth
    receipts: ReceiptsHealth = Field(default_factory=lambda: ReceiptsHealth.of(False))


# -- the service -------------------------------------------------------------------------------


class ProviderAdmin:
    def __init__(
        self,
        manager: ProviderManager,
        configs: ProviderConfigStore,
        store: PaymentStore,
        guard: ProviderGuard,
        reconciler: Reconciler,
        *,
        receipts_signed: bool = False,
        receipts_storage: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self._receipts_signed = receipts_signed
        self._receipts_storage = receipts_storage
        self._manager = manager
        self._configs = configs
        self._store = store
        self._guard = guard
        self._reconciler = reconciler

    # -- what is there ---------------------------------------------------------------------

    async def providers(self) -> list[ProviderInfo]:
        """Every provider: prefixes, capabilities, configured, active, breaker."""
        factory = self._manager.current
        return [
            ProviderInfo(
                name=provider.name,
                display_name=provider.display_name,
                service_type=provider.service_type,
                id_prefixes=list(provider.id_prefixes),
                capabilities=sorted(provider.capabilities),
                configured=provider.is_configured(),
                active=factory.is_active(provider),
                default=provider.name == factory.default,
                breaker=await self._guard.state(provider.name),
            )
            for provider in factory.providers()
        ]

    def schema(self, provider_key: str) -> ProviderSchema:
        """What may be stored for the provider (fields only the environment sets say
        ``readOnly``)."""
        cls = self._provider_class(provider_key)
        return ProviderSchema(
            provider=cls.name,
            config=cls.config_model.model_json_schema(),
            config_secret=cls.secrets_model.model_json_schema(),
            capabilities=sorted(cls.capabilities),
        )

    def _provider_class(self, key: str) -> type[BasePaymentProvider]:
        classes = self._manager.classes
        try:
            return classes[key]
        except KeyError:
            raise UnknownProvider(
                f"No provider named {key!r}; known: {', '.join(sorted(classes))}"
            ) from None

    # -- routing ---------------------------------------------------------------------------

    def routing(self) -> RoutingConfig:
        """The routing in force on this worker now."""
        factory = self._manager.current
        return RoutingConfig(
            default=factory.default,
            fallback=list(factory.fallback),
            weights=factory.weights or None,
        )

    async def set_routing(self, routing: RoutingConfig, *, force: bool = False) -> RoutingConfig:
        """Store the default provider, the fallback order or a weighted split; every worker
        follows within a second, this one at once.

        A default or a weighted provider that cannot take payments now (not configured, held
        out or deactivated) is refused, unless ``force``: to route to a provider about to be
        configured, say."""
        names = [routing.default] if routing.default else []
        names += list(routing.fallback or []) + list(routing.weights or {})
        for name in names:
            self._provider_class(name)
        if not force:
            factory = self._manager.current
            routed = [routing.default] if routing.default else []
            routed += [name for name, weight in (routing.weights or {}).items() if weight > 0]
            for name in routed:
                if not factory.is_active(factory.get(name)):
                    raise RoutingToInactiveProvider(
                        f"The {name} provider cannot take payments here (not configured or "
                        "deactivated); configure it first, or repeat with ?force=true",
                        extra={"provider": name},
                    )
        if routing.weights is not None and (
            any(weight < 0 for weight in routing.weights.values())
            or not sum(routing.weights.values())
        ):
            raise InvalidProviderConfig("Weights must be non-negative and not all zero")
        await self._configs.set_routing(routing)
        await self._manager.refresh()
        return self.routing()

    # -- stored configurations -------------------------------------------------------------

    async def configs(self) -> list[StoredProviderConfig]:
        return await self._configs.all()

    async def config(self, config_id: str) -> StoredProviderConfig:
        return await self._configs.get(config_id)

    async def create_config(self, body: ProviderConfigIn) -> StoredProviderConfig:
        """Store a provider's configuration (secrets encrypted at rest) and apply it."""
        cls = self._provider_class(body.provider_key)
        public, private = _validated(cls, body.config, body.config_secret, body.capabilities)
        stored = await self._configs.create(
            provider_key=body.provider_key,
            service_type=body.service_type,
            config=public or {},
            secrets_=private or {},
            capabilities=[str(c) for c in body.capabilities] if body.capabilities else None,
            active=body.active,
        )
        await self._manager.refresh()  # this worker at once; the others within a second
        return stored

    async def update_config(
        self, config_id: str, patch: ProviderConfigPatch
    ) -> StoredProviderConfig:
        """Change, activate or deactivate a stored configuration and apply it."""
        current = await self._configs.get(config_id)
        cls = self._provider_class(current.provider_key)
        secrets_in = patch.config_secret
        if secrets_in is not None:
            # Fields left out keep their stored values, so one secret can change alone.
            secrets_in = {**await self._configs.current_secrets(config_id), **secrets_in}
        public, private = _validated(cls, patch.config, secrets_in, patch.capabilities)
        stored = await self._configs.update(
            config_id,
            config=public,
            secrets_=private,
            capabilities=[str(c) for c in patch.capabilities] if patch.capabilities else None,
            active=patch.active,
        )
        await self._manager.refresh()
        return stored

    async def delete_config(self, config_id: str) -> None:
        """Forget a stored configuration: its provider goes back to the environment's."""
        await self._configs.delete(config_id)
        await self._manager.refresh()

    # -- our IDs and the providers' --------------------------------------------------------

    async def mappings(
        self,
        provider: str,
        entity: str,
        *,
        local_id: str | None = None,
        external_id: str | None = None,
        cursor: int = 0,
    ) -> MappingPage:
        """One mapping, looked up by either ID, or a page of them all."""
        self._provider_class(provider)
        if local_id is not None or external_id is not None:
            found = await self._store.lookup_mapping(
                provider, entity, local_id=local_id, external_id=external_id
            )
            if found is None:
                raise NotFound(f"No {entity} mapping for that ID at {provider}")
            return MappingPage(items=[MappingOut(**asdict(found))], next_cursor=None)
        next_cursor, items = await self._store.list_mappings(provider, entity, cursor=cursor)
        return MappingPage(
            items=[MappingOut(**asdict(item)) for item in items], next_cursor=next_cursor or None
        )

    async def link(self, mapping: MappingIn) -> MappingOut:
        """Map our ID to the provider's, both ways (a later link of the same ID replaces it)."""
        self._provider_class(mapping.provider)
        await self._store.link(
            mapping.provider, mapping.entity, mapping.local_id, mapping.external_id
        )
        return MappingOut(**mapping.model_dump())

    async def live_figures(self) -> LiveFigures:
        factory = self._manager.current
        names = [provider.name for provider in factory.providers()]
        states = await asyncio.gather(*(self._guard.state(name) for name in names))
        queued, due = await self._store.reconcile_queue_size()
        return LiveFigures(
            breakers={name: str(state) for name, state in zip(names, states, strict=True)},
            queued=queued,
            due=due,
        )

    # -- reconciliation and health ---------------------------------------------------------

    async def reconciliation(self) -> ReconciliationStats:
        """What the reconciliation job has done, and what it still has to do."""
        return ReconciliationStats.model_validate(await self._reconciler.stats())

    async def ready(self) -> None:
        """Returns when Redis answers and receipts can be stored; raises
        ``StoreUnavailable`` or ``ReceiptStorageUnavailable`` (with the reason) when not."""
        await self._store.ping()
        problem = await self._storage_problem()
        if problem is not None:
            raise ReceiptStorageUnavailable(problem)

    async def _storage_problem(self) -> str | None:
        return await self._receipts_storage() if self._receipts_storage is not None else None

    async def health(self) -> AdminHealth:
        """Redis, each provider, and the stored configurations. Unhealthy when Redis or the
        default provider cannot serve; degraded when anything else is wrong."""
        started = time.perf_counter()
        try:
            await self._store.ping()
            redis = {
                "status": "connected",
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        except StoreUnavailable:
            redis = {"status": "error", "latency_ms": None}
        # Read once, with the providers it describes: a reload may swap both meanwhile.
        factory, unreadable = self._manager.current, self._manager.unreadable_configs()
        checks = await asyncio.gather(
            *(self._provider_health(provider) for provider in factory.providers())
        )
        providers = {check.provider: check for check in checks}
        # Who takes new payments: the default (or the weighted split), then the fallbacks.
        routed = [factory.default, *factory.weights, *factory.fallback]

        def takes_payments(name: str) -> bool:
            check = providers.get(name)
            return (
                check is not None
                and check.status == "connected"
                and factory.is_active(factory.get(name))
            )

        serving = [name for name in routed if takes_payments(name)]
        storage_problem = await self._storage_problem()
        status: Literal["healthy", "degraded", "unhealthy"]
        if redis["status"] != "connected" or not serving:
            status = "unhealthy"  # no payment can be taken
        elif (
            not takes_payments(factory.default)
            or storage_problem is not None
            or unreadable is not None
            or any(check.status in {"error", "circuit_open"} for check in checks)
        ):
            status = "degraded"  # payments work, through a fallback or with a problem beside
        else:
            status = "healthy"
        return AdminHealth(
            status=status,
            redis=redis,
            providers=providers,
            stored_configs=StoredConfigsHealth.of(unreadable),
            receipts=ReceiptsHealth.of(self._receipts_signed, storage_problem),
        )

    async def _provider_health(self, provider: BasePaymentProvider) -> ProviderHealth:
        if isinstance(provider, HeldOutProvider):  # its stored configuration is unusable
            return ProviderHealth(
                provider=provider.name, status="error", configured=False, message=provider.reason
            )
        if not provider.is_configured():
            return ProviderHealth(
                provider=provider.name,
                status="unconfigured",
                configured=False,
                message=_what_configures(type(provider)),
            )
        breaker = await self._guard.state(provider.name)
        if breaker is not BreakerState.CLOSED:
            return ProviderHealth(
                provider=provider.name,
                status="circuit_open",
                configured=True,
                breaker=breaker,
                message="recent technical failures; calls are refused until a probe succeeds",
            )
        try:
            result = await asyncio.wait_for(provider.health_check(), HEALTH_CHECK_TIMEOUT_S)
        except Exception as error:  # a health check reports failure, it does not fail
            # The cause, for the operator: a ServiceError's own words (they never carry a
            # secret), else the kind of failure (a connection error names the host).
            cause = error.detail if isinstance(error, ServiceError) else str(error)
            return ProviderHealth(
                provider=provider.name,
                status="error",
                configured=True,
                message=f"{type(error).__name__}: {cause}"[:300] if cause else type(error).__name__,
            )
        return ProviderHealth(
            provider=provider.name,
            status="connected" if result.healthy else "error",
            configured=True,
            breaker=breaker,
            latency_ms=result.latency_ms,
            message=result.message,
        )


def _what_configures(cls: type[BasePaymentProvider]) -> str:
    """Why a provider is not configured, in the settings that would configure it."""
    if cls.settings_prefix is None:
        return "not available on this service"
    required = [
        f"{cls.settings_prefix}{name}".upper()
        for model in (cls.config_model, cls.secrets_model)
        for name, info in model.model_fields.items()
        if info.is_required()
    ]
    if not required:
        return "not configured"
    return f"not configured: needs {', '.join(required)} (environment or a stored configuration)"


def _validated(
    cls: type[BasePaymentProvider],
    config: dict[str, Any] | None,
    secrets: dict[str, Any] | None,
    capabilities: list[Capability] | None,
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """Check a configuration against the provider's models. Errors name the field and never
    carry the value: it may be a secret. A field only the environment sets is refused."""
    errors: list[dict[str, Any]] = []
    public = private = None
    for part, model, values in (
        ("config", cls.config_model, config),
        ("config_secret", cls.secrets_model, secrets),
    ):
        if values is None:
            continue
        only_environment = environment_only_fields(model)
        errors += [
            {
                "loc": [part, name],
                "type": "environment_only",
                "msg": "Set only in the environment, never stored",
            }
            for name in sorted(only_environment & values.keys())
        ]
        try:
            validated = model.model_validate(values)
        except ValidationError as error:
            errors += [
                {"loc": [part, *map(str, item["loc"])], "type": item["type"], "msg": item["msg"]}
                for item in error.errors(include_input=False, include_url=False)
            ]
            continue
        if part == "config":
            public = validated.model_dump(
                mode="json", exclude_none=True, exclude=set(only_environment)
            )
        else:
            errors += [
                {"loc": [part, name], "type": "not_printable_ascii", "msg": NOT_HEADER_SAFE}
                for name in unsendable_secrets(validated)
            ]
            private = {
                name: value
                for name, value in secret_values(validated).items()
                if name not in only_environment
            }
    for capability in capabilities or []:
        if capability not in cls.capabilities:
            errors.append(
                {
                    "loc": ["capabilities"],
                    "type": "unsupported",
                    "msg": f"{cls.name} does not offer {capability}",
                }
            )
    if errors:
        fields = ", ".join(".".join(item["loc"]) for item in errors)
        raise InvalidProviderConfig(f"Invalid fields: {fields}", extra={"errors": errors})
    return public, private
