"""Hot swap: each worker rebuilds its providers when a stored configuration changes.

Every worker polls the configuration version in Redis every ``poll_s`` (a GET, 4 a second by
default) and, when it moved, builds a new ``PaymentProviderFactory`` from the environment plus
the stored configurations and swaps it in. A request in flight keeps the provider instance it
already holds; the replaced instances are closed after a grace period, so nothing is dropped.
How a provider's config and secret models are made from the environment and its stored
configuration is the app's business (``configure``; the manager never reads settings).

A stored configuration whose secrets this process cannot decrypt (PROVIDER_SECRETS_KEY unset
or wrong), or that no longer fits its provider's models, is never dropped silently: its
provider is held out (it refuses every operation, rather than run on the environment's
credentials, which may be another account's), the rest
of the stored layer still applies (other configurations, deactivations, routing), and
``unreadable_configs`` says which and why, for the health check, the command line and the
start-up check that refuses to serve in production. The condition is logged when it starts,
changes or clears, not on every reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from services.errors import ServiceError
from services.payment_providers.base import BasePaymentProvider
from services.payment_providers.factory import PaymentProviderFactory
from services.payment_providers.placeholders import HeldOutProvider
from services.provider_configs import (
    ProviderModels,
    StoredConfigInvalid,
    StoredLayer,
    StoredProvider,
    UnreadableConfigs,
)

if TYPE_CHECKING:
    from services.payment_providers.base import ProviderDeps
    from services.provider_configs import ProviderConfigStore, RoutingConfig

log = logging.getLogger("payments.providers")

CLOSE_GRACE_S = 60.0


class StoredConfigsUnreadable(RuntimeError):
    """Production refuses to start while stored configurations cannot be read."""


# A provider class and its stored configuration (None: none, or deactivated) -> the models
# it is built from. Raises StoredConfigInvalid when the stored configuration does not fit.
Configure = Callable[[type[BasePaymentProvider], StoredProvider | None], ProviderModels]


class ProviderManager:
    def __init__(
        self,
        classes: Mapping[str, type[BasePaymentProvider]],
        configure: Configure,
        deps: ProviderDeps,
        configs: ProviderConfigStore,
        *,
        default: str,
        fallback: Iterable[str] = (),
        poll_s: float = 0.25,
    ) -> None:
        self._classes = dict(classes)
        self._configure = configure
        self._deps = deps
        self._configs = configs
        self._default = default  # PAYMENT_PROVIDER and PAYMENT_FALLBACK, until routing is stored
        self._fallback = tuple(fallback)
        self._poll_s = poll_s
        self._current = self._build(StoredLayer(), None)
        self._unreadable: UnreadableConfigs | None = None
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._retired: dict[asyncio.Task[None], PaymentProviderFactory] = {}

    @property
    def current(self) -> PaymentProviderFactory:
        return self._current

    @property
    def classes(self) -> dict[str, type[BasePaymentProvider]]:
        return self._classes

    def unreadable_configs(self) -> UnreadableConfigs | None:
        """The stored configurations the current providers were built without, because
        their secrets do not decrypt, and why; None when every one was read."""
        return self._unreadable

    async def start(self) -> None:
        """Load stored configurations (if Redis answers) and start watching for changes."""
        with contextlib.suppress(ServiceError):
            await self.refresh()
        self._task = asyncio.create_task(self._watch(), name="provider-config-watch")

    async def refresh(self) -> bool:
        """Rebuild when the stored version moved. True when providers were swapped."""
        version = await self._configs.version()
        if version == self._version:
            return False
        stored = await self._configs.load_for_build()
        routing = await self._configs.routing()
        previous, self._current = self._current, self._build(stored, routing)
        self._version = version
        self._retire(previous)
        self._note_unreadable(stored.unreadable)
        log.info(
            "providers.reloaded",
            extra={
                "version": version,
                "stored": sorted(stored.providers),
                "default": self._current.default,
            },
        )
        return True

    def _note_unreadable(self, unreadable: UnreadableConfigs | None) -> None:
        """Log when the condition starts, changes or clears; a reload that finds it as it
        was says nothing."""
        if unreadable == self._unreadable:
            return
        if unreadable is not None:
            log.error(
                "providers.stored_configs_unreadable",
                extra={
                    "problem": str(unreadable.problem),
                    "held_out": list(unreadable.providers),
                    "reason": unreadable.reason,
                },
            )
        else:
            log.warning("providers.stored_configs_readable_again")
        self._unreadable = unreadable

    def _build(self, stored: StoredLayer, routing: RoutingConfig | None) -> PaymentProviderFactory:
        providers: list[BasePaymentProvider] = []
        inactive = set()
        unreadable = stored.unreadable
        for name, cls in self._classes.items():
            if unreadable is not None and name in unreadable.providers:
                providers.append(HeldOutProvider.standing_in_for(cls, unreadable.reason))
                continue
            config = stored.providers.get(name)
            if config is not None and not config.active:
                inactive.add(name)
                config = None  # a deactivated configuration's fields do not apply
            try:
                models = self._configure(cls, config)
            except StoredConfigInvalid as error:
                log.error(
                    "providers.stored_config_invalid",
                    extra={"provider": name, "fields": list(error.fields)},
                )
                providers.append(HeldOutProvider.standing_in_for(cls, error.reason))
                continue
            providers.append(cls.from_config(models.config, models.secrets, self._deps))
        default = (routing.default if routing else None) or self._default
        fallback = routing.fallback if routing and routing.fallback is not None else None
        return PaymentProviderFactory.create(
            providers,
            production=self._deps.production,
            default=default,
            fallback=self._fallback if fallback is None else fallback,
            weights=(routing.weights if routing else None) or {},
            inactive=inactive,
        )

    def _retire(self, factory: PaymentProviderFactory) -> None:
        async def close_later() -> None:
            await asyncio.sleep(CLOSE_GRACE_S)
            await factory.aclose()

        task = asyncio.create_task(close_later())
        self._retired[task] = factory
        task.add_done_callback(lambda done: self._retired.pop(done, None))

    async def _watch(self) -> None:
        # The flag, not only the cancellation, ends the loop: a cancel that lands inside a Redis
        # call can come back out of the client as a connection error, which is swallowed below.
        while not self._closing:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except ServiceError:
                pass  # Redis away: keep serving with what we have; try again next tick
            except Exception:
                log.exception("providers.reload_failed")

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self._poll_s * 4)
        for task, factory in list(self._retired.items()):
            task.cancel()
            await factory.aclose()
        await self._current.aclose()
