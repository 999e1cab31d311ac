"""The ASGI app: ``app.main:app``. ``create_app(settings)`` builds one for tests and tools."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx2
from fastapi import FastAPI

from app import openapi
from app.logging import configure_logging
from app.metrics import RequestMetrics, serve_metrics_port
from app.middleware import BodySizeLimit
from app.problems import install_problem_handlers
from app.provider_settings import provider_manager
from app.security import decode_access_token
from app.settings import Settings
from app.tracing import Tracing
from routers import (
    admin_ui,
    api_docs,
    authorizenet,
    health,
    metrics,
    payments,
    providers,
    sandbox,
    subscriptions,
    webhook_endpoints,
)
from services.admin_sessions import AdminSessions
from services.admin_views import AdminViews
from services.catalogue import Catalogue
from services.checkout import CheckoutConfig, CheckoutService
from services.events.deliveries import DeliveryStore
from services.events.endpoints import EndpointStore
from services.events.outbox import slot_tags
from services.events.sender import Sender
from services.events.service import EventsConfig, WebhookEvents
from services.events.urls import UrlGuard
from services.idempotency import IdempotencyClaims
from services.operations import PaymentOperations
from services.payment_providers.authorizenet.hosted_page import AuthorizeNetHostedPage
from services.payment_providers.base import LocalEvents, ProviderDeps
from services.payment_providers.breaker import BreakerPolicy
from services.payment_providers.factory import PaymentProviderFactory
from services.payment_providers.guard import ProviderGuard
from services.payment_providers.sandbox_checkout import SandboxCheckout
from services.payment_receipts import PaymentReceipts
from services.payment_state import PaymentStateService
from services.payment_store import PaymentStore, RedisClient, key_values, redis_client
from services.plan_sync import PlanSync
from services.provider_admin import ProviderAdmin
from services.provider_configs import ProviderConfigStore, SecretBox
from services.provider_manager import StoredConfigsUnreadable
from services.receipt_document import Seller
from services.receipt_ledger import ReceiptLedger
from services.receipt_service import ReceiptConfig, ReceiptService
from services.receipt_signing import signing_material
from services.reconciler import Reconciler
from services.refunds import RefundService
from services.subscription_state import SubscriptionStateService
from services.subscription_store import SubscriptionStore
from services.subscriptions import SubscriptionConfig, SubscriptionService
from services.tax import TaxPolicy, vat_country

log = logging.getLogger("payments.app")

ROUTERS = (
    payments,
    subscriptions,
    sandbox,
    authorizenet,
    health,
    providers,
    api_docs,
    metrics,
    admin_ui,
    webhook_endpoints,
)
GC_YOUNG_THRESHOLD = 20_000


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # One client, standalone or Cluster; it connects lazily and reconnects by itself.
    redis = redis_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=settings.redis_timeout_seconds,
    )
    tracing: Tracing | None = app.state.tracing
    if tracing is not None:
        tracing.instrument_redis(redis)
    http = httpx2.AsyncClient(timeout=settings.provider_timeout_seconds)
    store = PaymentStore(redis, prefix=settings.redis_key_prefix)
    configs = ProviderConfigStore(
        redis, prefix=settings.redis_key_prefix, box=SecretBox(settings.provider_secrets_key_value)
    )
    # Providers that live inside the service tell it of their own changes through this.
    local_events = LocalEvents()
    manager = provider_manager(
        settings,
        ProviderDeps(
            key_value=key_values(redis, settings.redis_key_prefix),
            http=http,
            events=local_events,
            mappings=store,
            timeout_s=settings.provider_timeout_seconds,
            production=settings.environment == "production",
        ),
        configs,
    )
    try:
        await manager.start()
    except BaseException:
        # A start that fails (Redis unreachable in a way the client cannot ride out, a bad
        # provider setting) leaves no client open behind it.
        await http.aclose()
        await redis.aclose()
        raise
    unreadable = manager.unreadable_configs()
    if unreadable is not None and settings.environment == "production":
        # Production never serves without the credentials an operator stored: say why, stop.
        await manager.aclose()
        await http.aclose()
        await redis.aclose()
        raise StoredConfigsUnreadable(f"refusing to start in production: {unreadable.reason}")
    receipts = ReceiptService(
        receipt_config(settings),
        ReceiptLedger(redis, prefix=settings.redis_key_prefix),
        executor=app.state.receipt_executor,
    )
    guard = ProviderGuard(
        redis,
        key_prefix=settings.redis_key_prefix,
        policy=BreakerPolicy(
            min_calls=settings.breaker_min_calls,
            failure_ratio=settings.breaker_failure_ratio,
            window_s=settings.breaker_window_seconds,
            cooldown_s=settings.breaker_cooldown_seconds,
        ),
        deadline_s=settings.provider_deadline_seconds,
        tracer=tracing.tracer() if tracing is not None else None,
    )

    def providers() -> PaymentProviderFactory:
        """The providers as configured now: a hot swap replaces them between requests."""
        return manager.current

    reconcile_after_s = settings.reconcile_schedule[0] if settings.reconcile_enabled else None
    catalogue = Catalogue(settings.plans)
    claims = IdempotencyClaims(store, lease_s=settings.idempotency_lease_seconds)
    payment_receipts = PaymentReceipts(store, providers, catalogue, receipts)
    refunds = RefundService(
        store,
        providers,
        guard,
        claims,
        reconcile_after_s=reconcile_after_s,
        on_succeeded=payment_receipts.credit_note_soon,
    )
    payment_state = PaymentStateService(
        store, providers, guard, refunds, on_paid=payment_receipts.render_soon
    )
    local_events.connect(payment_state.apply_provider_event)
    plan_sync = PlanSync(catalogue, store, providers, guard)
    subscription_store = SubscriptionStore(redis, prefix=settings.redis_key_prefix)
    subscription_state = SubscriptionStateService(
        subscription_store,
        store,
        providers,
        guard,
        plan_sync,
        on_paid=payment_receipts.render_soon,
    )
    payment_state.connect_subscriptions(subscription_state)
    subscription_service = SubscriptionService(
        SubscriptionConfig(
            public_base_url=settings.public_base_url,
            redirect_hosts=settings.redirect_hosts,
            reconcile_after_s=reconcile_after_s,
            grace_days=settings.subscription_grace_days,
            proration=settings.subscription_proration,
        ),
        catalogue,
        subscription_store,
        store,
        providers,
        guard,
        claims,
        plan_sync,
        subscription_state,
    )
    checkout = CheckoutService(
        CheckoutConfig(
            public_base_url=settings.public_base_url,
            redirect_hosts=settings.redirect_hosts,
            reconcile_after_s=reconcile_after_s,
        ),
        catalogue,
        store,
        providers,
        guard,
        claims,
        tax=tax_policy(settings),
    )
    operations = PaymentOperations(
        payment_state, store, providers, guard, refunds, reconcile_after_s=reconcile_after_s
    )
    reconciler = Reconciler(
        payment_state,
        store,
        redis,
        schedule_s=settings.reconcile_schedule,
        interval_s=settings.reconcile_interval_seconds,
        batch=settings.reconcile_batch,
        subscriptions=subscription_state,
    )
    events = webhook_events(redis, http, store, settings)
    app.state.webhook_events = events
    app.state.store = store
    app.state.subscriptions = subscription_service
    app.state.plan_sync = plan_sync
    app.state.provider_admin = ProviderAdmin(
        manager,
        configs,
        store,
        guard,
        reconciler,
        receipts_signed=receipts.signed,
        receipts_storage=receipts.storage_problem,
    )
    # The admin dashboard: its pages call the same services as the admin API.
    app.state.admin_views = AdminViews(app.state.provider_admin, store, operations, webhooks=events)
    app.state.admin_sessions = AdminSessions(
        redis,
        key_prefix=settings.redis_key_prefix,
        ttl_s=settings.admin_session_ttl_seconds,
        verify_token=partial(decode_access_token, settings),
        public_base_url=settings.public_base_url,
    )
    app.state.checkout = checkout
    app.state.payment_state = payment_state
    app.state.operations = operations
    app.state.receipts = payment_receipts
    app.state.guard = guard
    app.state.reconciler = reconciler
    app.state.sandbox_checkout = SandboxCheckout(providers)
    app.state.authorizenet_page = AuthorizeNetHostedPage(providers)
    if settings.receipt_warm_up:
        await receipts.warm_up()
    log.info(
        "app.started",
        extra={
            "environment": settings.environment,
            "default_provider": settings.payment_provider,
            "configured": [p.name for p in manager.current.providers() if p.is_configured()],
        },
    )
    if settings.reconcile_enabled:
        reconciler.start()
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server, metrics_task = await serve_metrics_port(
            settings.metrics_host,
            settings.metrics_port,
            app.state.provider_admin.live_figures,
        )
    # Vendor prices for the recurring plans, in the background: start-up never waits on a
    # vendor (a subscription made meanwhile syncs its own price).
    syncing = (
        asyncio.create_task(plan_sync.run_logged(), name="plan-sync")
        if settings.plan_sync_on_start and catalogue.recurring_prices() and plan_sync.billers()
        else None
    )
    if settings.webhook_worker_enabled:
        events.start()
    collector = _tune_collector()
    try:
        yield
    finally:
        if metrics_server is not None:
            metrics_server.should_exit = True
            await metrics_task
        if syncing is not None:
            syncing.cancel()
            await asyncio.gather(syncing, return_exceptions=True)
        await events.aclose()
        await reconciler.aclose()
        await payment_receipts.drain()
        receipts.close()
        await manager.aclose()
        await http.aclose()
        await redis.aclose()
        collector.restore()
        if tracing is not None:
            tracing.shutdown()


def webhook_events(
    redis: RedisClient, http: httpx2.AsyncClient, store: PaymentStore, settings: Settings
) -> WebhookEvents:
    """Events for the merchant's backend, told of every outbox write of ``store``."""
    guard = UrlGuard(
        allow_private=settings.webhook_allow_private_urls,
        require_https=settings.environment == "production",
    )
    prefix = settings.redis_key_prefix
    endpoints = EndpointStore(
        redis, prefix=prefix, box=SecretBox(settings.provider_secrets_key_value), guard=guard
    )
    if settings.redis_cluster:
        slot_tags()  # the per-slot outbox indexes' tags, found once now, not on a request
    events = WebhookEvents(
        redis,
        store.outbox,
        endpoints,
        DeliveryStore(
            redis,
            endpoints,
            log_size=settings.webhook_log_size,
            retention_s=settings.webhook_retention_seconds,
        ),
        Sender(http, guard, timeout_s=settings.webhook_timeout_seconds),
        EventsConfig(
            retry_schedule_s=settings.webhook_retry_schedule,
            claim_idle_s=settings.webhook_claim_idle_seconds,
            poll_interval_s=settings.webhook_poll_interval_seconds,
            sweep_interval_s=settings.webhook_sweep_interval_seconds,
            sweep_grace_s=settings.webhook_sweep_grace_seconds,
        ),
        prefix=prefix,
    )
    store.outbox_listener = events.nudge
    return events


def tax_policy(settings: Settings) -> TaxPolicy:
    seller_country = settings.merchant_country or (
        vat_country(settings.merchant_vat_id) if settings.merchant_vat_id else None
    )
    return TaxPolicy(
        default_rate=settings.tax_rate,
        name=settings.tax_name,
        prices_include_tax=settings.prices_include_tax,
        reverse_charge_enabled=settings.reverse_charge_enabled,
        seller_country=seller_country,
    )


def receipt_config(settings: Settings) -> ReceiptConfig:
    key = settings.receipt_signing_key
    return ReceiptConfig(
        seller=Seller(
            name=settings.merchant_name,
            address=settings.merchant_address,
            vat_id=settings.merchant_vat_id,
            email=settings.merchant_email,
            website=settings.merchant_website,
        ),
        directory=settings.receipts_dir,
        tax=tax_policy(settings),
        locale=settings.receipt_locale,
        receipt_number_format=settings.receipt_number_format,
        credit_note_number_format=settings.credit_note_number_format,
        signing=signing_material(
            key.get_secret_value() if key else None, settings.receipt_signing_cert
        ),
        render_workers=settings.receipt_render_workers,
        memory_cache_bytes=settings.receipt_memory_cache_bytes,
    )


@dataclass(frozen=True)
class _Collector:
    thresholds: tuple[int, int, int]

    def restore(self) -> None:
        gc.unfreeze()
        gc.set_threshold(*self.thresholds)


def _tune_collector() -> _Collector:
    """Keep the cyclic garbage collector off the request path, once the app has started.

    Its default first threshold (700 more young container objects alive than freed) is
    crossed all the time by the thirty-odd requests in flight under load, whatever garbage
    there is: it ran about once every nine requests, and each run with an older generation
    also walked every object built at start-up, 80 us a request in all (a tenth of a
    create-intent's CPU, a seventh of a receipt read's). The objects alive now are frozen
    out of its sight, and the threshold becomes one that traffic alone does not reach.
    """
    collector = _Collector(gc.get_threshold())
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *collector.thresholds[1:])
    return collector


def create_app(
    settings: Settings | None = None, *, receipt_executor: ProcessPoolExecutor | None = None
) -> FastAPI:
    """Build the app. ``receipt_executor`` shares one render pool between apps (tests)."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="Payment service",
        version="0.1.0",
        summary="Sells the plan catalogue through interchangeable payment providers.",
        lifespan=lifespan,
        # Served by routers/api_docs.py from packaged assets, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    for module in ROUTERS:
        app.include_router(module.router)
    app.state.settings = settings
    app.state.receipt_executor = receipt_executor
    install_problem_handlers(app)
    openapi.install(app, settings)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        max_webhook_bytes=settings.max_webhook_body_bytes,
    )
    # Outermost: every request is counted and timed, refusals by the limits above included.
    app.add_middleware(RequestMetrics)
    if settings.otel_exporter_otlp_endpoint:
        tracing = Tracing.start(settings.otel_exporter_otlp_endpoint, settings.otel_service_name)
        tracing.instrument_app(app)  # outside the metrics: they log inside its span
        app.state.tracing = tracing
    else:
        app.state.tracing = None
    return app


def __getattr__(name: str) -> FastAPI:
    # `app.main:app` is built on first use, so importing this module reads no settings.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
