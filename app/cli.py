"""`payments`: the service's command line (serve, token, providers, secrets, receipts)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from pydantic_settings import SettingsError

from services.errors import ServiceError


def _token(args: argparse.Namespace) -> int:
    from app.security import create_access_token
    from app.settings import Settings

    settings = Settings()
    print(
        create_access_token(
            settings,
            args.sub,
            admin=args.admin,
            expires_minutes=args.expires_minutes,
            email=args.email,
        )
    )
    return 0


if TYPE_CHECKING:
    from app.settings import Settings
    from services.provider_configs import ProviderConfigStore
    from services.provider_manager import ProviderManager


# Where `make run` (scripts/run-local.sh) records the Redis it started, for the CLI run from
# the same directory (as .env is read from it).
LOCAL_REDIS_FILE = Path("var") / "redis.url"


def _local_redis(settings: Settings) -> Settings:
    """``settings``, on the Redis that `make run` started when REDIS_URL names none: the CLI
    and the local server then read and write the same data."""
    if "redis_url" in settings.model_fields_set or not LOCAL_REDIS_FILE.is_file():
        return settings
    recorded = LOCAL_REDIS_FILE.read_text(encoding="utf-8").strip()
    return settings.model_copy(update={"redis_url": recorded}) if recorded else settings


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":****@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _say_which_redis(settings: Settings) -> None:
    where = "REDIS_CLUSTER" if settings.redis_cluster else "Redis"
    print(f"{where}: {_without_password(settings.redis_url)}", file=sys.stderr)


@asynccontextmanager
async def _platform() -> AsyncIterator[tuple[ProviderManager, ProviderConfigStore]]:
    """The providers as a worker would build them: environment plus stored configurations."""
    import httpx2

    from app.provider_settings import provider_manager
    from app.settings import Settings
    from services.payment_providers.base import ProviderDeps
    from services.payment_store import PaymentStore, key_values, redis_client
    from services.provider_configs import ProviderConfigStore, SecretBox

    settings = _local_redis(Settings())
    _say_which_redis(settings)
    # The same client the service uses: standalone or Cluster, as REDIS_CLUSTER says.
    redis = redis_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=settings.redis_timeout_seconds,
    )
    http = httpx2.AsyncClient(timeout=settings.provider_timeout_seconds)
    configs = ProviderConfigStore(
        redis, prefix=settings.redis_key_prefix, box=SecretBox(settings.provider_secrets_key_value)
    )
    deps = ProviderDeps(
        key_value=key_values(redis, settings.redis_key_prefix),
        http=http,
        mappings=PaymentStore(redis, prefix=settings.redis_key_prefix),
        timeout_s=settings.provider_timeout_seconds,
        production=settings.environment == "production",
    )
    manager = provider_manager(settings, deps, configs)
    try:
        try:
            await manager.refresh()
        except Exception as error:  # still useful from the environment alone
            print(f"note: stored configurations not read ({type(error).__name__})", file=sys.stderr)
        unreadable = manager.unreadable_configs()
        if unreadable is not None:
            print(f"degraded: {unreadable.reason}", file=sys.stderr)
        yield manager, configs
    finally:
        await manager.current.aclose()
        await http.aclose()
        await redis.aclose()


async def _providers_list() -> int:
    async with _platform() as (manager, _):
        factory = manager.current
        providers = factory.providers()
        # Columns as wide as their longest entry, so that every row lines up.
        name_width = max(len("provider"), *(len(provider.name) for provider in providers))
        prefix_width = max(
            len("prefixes"), *(len(",".join(provider.id_prefixes)) for provider in providers)
        )
        print(
            f"{'provider':<{name_width}}  {'configured':<10}  {'active':<6}  "
            f"{'prefixes':<{prefix_width}}  capabilities"
        )
        for provider in providers:
            default = " (default)" if provider.name == factory.default else ""
            print(
                f"{provider.name:<{name_width}}  {str(provider.is_configured()).lower():<10}  "
                f"{str(factory.is_active(provider)).lower():<6}  "
                f"{','.join(provider.id_prefixes):<{prefix_width}}  "
                f"{','.join(sorted(provider.capabilities))}{default}"
            )
    return 0


async def _providers_test(name: str | None) -> int:
    """Run the health checks; non-zero when one fails (or NAME is unknown/unconfigured)."""
    async with _platform() as (manager, _):
        factory = manager.current
        if name is not None:
            chosen = [factory.get(name)]
        else:
            chosen = [p for p in factory.providers() if factory.is_active(p)]
        failed = 0
        for provider in chosen:
            if not factory.is_active(provider):
                print(f"{provider.name}: FAIL not configured or deactivated")
                failed += 1
                continue
            try:
                result = await asyncio.wait_for(provider.health_check(), 10)
            except Exception as error:
                print(f"{provider.name}: FAIL {type(error).__name__}")
                failed += 1
                continue
            verdict = "ok" if result.healthy else "FAIL"
            failed += not result.healthy
            print(f"{provider.name}: {verdict} {result.message} ({result.latency_ms} ms)")
    return 1 if failed else 0


async def _mappings_list(provider: str, entity: str) -> int:
    from services.payment_store import PaymentStore

    async with _platform() as (manager, configs):
        manager.current.get(provider)
        store = PaymentStore(configs.redis, prefix=configs.prefix)
        cursor = 0
        while True:
            cursor, items = await store.list_mappings(provider, entity, cursor=cursor)
            for item in items:
                print(f"{item.local_id}\t{item.external_id}")
            if not cursor:
                return 0


async def _mappings_lookup(provider: str, entity: str, some_id: str) -> int:
    """Looks the ID up as ours first, then as the provider's."""
    from services.payment_store import PaymentStore

    async with _platform() as (manager, configs):
        manager.current.get(provider)
        store = PaymentStore(configs.redis, prefix=configs.prefix)
        found = await store.lookup_mapping(provider, entity, local_id=some_id)
        found = found or await store.lookup_mapping(provider, entity, external_id=some_id)
        if found is None:
            print(f"no {entity} mapping for {some_id} at {provider}", file=sys.stderr)
            return 1
        print(f"local_id={found.local_id} external_id={found.external_id}")
        return 0


async def _mappings_link(provider: str, entity: str, local_id: str, external_id: str) -> int:
    """Map one of our IDs to the provider's (a plan to a Paddle price, a LemonSqueezy
    variant), both ways."""
    from services.payment_store import PaymentStore

    async with _platform() as (manager, configs):
        manager.current.get(provider)
        store = PaymentStore(configs.redis, prefix=configs.prefix)
        await store.link(provider, entity, local_id, external_id)
        print(f"linked {provider} {entity} {local_id} -> {external_id}")
        return 0


async def _plans_sync() -> int:
    """Make vendor prices of every recurring plan at each provider that bills subscriptions;
    non-zero when one failed."""
    from app.settings import Settings
    from services.catalogue import Catalogue
    from services.payment_providers.breaker import BreakerPolicy
    from services.payment_providers.guard import ProviderGuard
    from services.payment_store import PaymentStore, redis_client
    from services.plan_sync import PlanSync

    settings = _local_redis(Settings())
    async with _platform() as (manager, _):
        redis = redis_client(
            settings.redis_url,
            cluster=settings.redis_cluster,
            timeout_s=settings.redis_timeout_seconds,
        )
        try:
            guard = ProviderGuard(
                redis,
                key_prefix=settings.redis_key_prefix,
                policy=BreakerPolicy(),
                deadline_s=settings.provider_deadline_seconds,
            )
            sync = PlanSync(
                Catalogue(settings.plans),
                PaymentStore(redis, prefix=settings.redis_key_prefix),
                lambda: manager.current,
                guard,
            )
            results = await sync.run()
        finally:
            await redis.aclose()
    if not results:  # said, rather than a silent success that looks like a hang-up
        print("nothing to sync: no recurring plan that an active subscription provider charges")
    for item in results:
        print(f"{item.provider:<11} {item.price_key:<40} {item.vendor_price_id or item.error}")
    return 1 if any(item.error for item in results) else 0


async def _rotate_secrets() -> int:
    """Every secret kept under PROVIDER_SECRETS_KEY: the stored provider configurations and
    the webhook endpoints' signing secrets."""
    from app.settings import Settings
    from services.events.endpoints import EndpointStore
    from services.events.urls import UrlGuard
    from services.provider_configs import SecretBox

    settings = _local_redis(Settings())
    async with _platform() as (_, configs):
        print(f"re-encrypted {await configs.rotate_secrets()} stored configuration(s)")
        endpoints = EndpointStore(
            configs.redis,
            prefix=settings.redis_key_prefix,
            box=SecretBox(settings.provider_secrets_key_value),
            guard=UrlGuard(allow_private=False, require_https=True),  # no URL is checked here
        )
        print(f"re-encrypted {await endpoints.reencrypt_secrets()} webhook endpoint secret(s)")
    return 0


async def _receipts_verify() -> int:
    """Walk the receipts' hash chain and the stored PDFs; exit 1 naming the first mismatch."""
    from app.settings import Settings
    from services.payment_store import redis_client
    from services.receipt_ledger import ReceiptLedger, verify
    from services.receipt_service import document_path

    # The same Redis as `make run` when REDIS_URL names none: another Redis would have no
    # chain, or another service's, and "ok: 0 chain entries" would say nothing true.
    settings = _local_redis(Settings())
    _say_which_redis(settings)
    redis = redis_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=settings.redis_timeout_seconds,
    )

    def read_pdf(doc_id: str) -> bytes | None:
        try:
            return document_path(settings.receipts_dir, doc_id).read_bytes()
        except FileNotFoundError:
            return None

    try:
        report = await verify(ReceiptLedger(redis, prefix=settings.redis_key_prefix), read_pdf)
    finally:
        await redis.aclose()
    if report.mismatch is not None:
        print(f"MISMATCH {report.mismatch}")
        return 1
    print(f"ok: {report.entries} chain entries, {report.documents} documents match")
    return 0


def _secrets_key(_: argparse.Namespace) -> int:
    from cryptography.fernet import Fernet

    print(Fernet.generate_key().decode())
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logging import uvicorn_log_config
    from app.settings import Settings

    settings = Settings()
    # uvicorn trusts the same proxies as the app (which reads X-Forwarded-For itself, see
    # app.deps.client_address), for the scheme they forward; none when none is listed, where
    # uvicorn's own default would trust any local peer's X-Forwarded-For.
    proxies = ",".join(str(network) for network in settings.forwarded_allow_ips)
    workers = args.workers or int(os.environ.get("WEB_CONCURRENCY") or 1)
    metrics_dir = _metrics_directory(workers)
    try:
        uvicorn.run(
            "app.main:app",
            host=args.host,
            port=args.port or settings.port,
            workers=workers,
            proxy_headers=bool(proxies),
            forwarded_allow_ips=proxies or None,
            log_level=settings.log_level.lower(),
            log_config=uvicorn_log_config(),
        )
    finally:
        if metrics_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _metrics_directory(workers: int) -> str | None:
    """With several workers, prometheus-client's multiprocess mode: each worker writes its
    figures to files in PROMETHEUS_MULTIPROC_DIR and /metrics sums them. A directory the
    operator names is emptied first (figures of a previous run would add up); without one,
    a temporary one is made here, and removed when the server stops (its path returned)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        return None
    if workers < 2:
        return None
    made = tempfile.mkdtemp(prefix="payments-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="payments", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="print a bearer token for local use")
    token.add_argument("--sub", required=True, help="the user the token is for")
    token.add_argument("--admin", action="store_true", help="give the token role=admin")
    token.add_argument("--expires-minutes", type=int, default=None)
    token.add_argument("--email", default=None, help="the user's email (the token's email claim)")
    token.set_defaults(handler=_token)

    serve = commands.add_parser("serve", help="serve the API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: WEB_CONCURRENCY, else 1)",
    )
    serve.set_defaults(handler=_serve)

    providers = commands.add_parser("providers", help="list or health-check the providers")
    provider_commands = providers.add_subparsers(dest="action", required=True)
    provider_commands.add_parser("list", help="every provider and its state").set_defaults(
        handler=lambda _: asyncio.run(_providers_list())
    )
    test = provider_commands.add_parser("test", help="run health checks; exit 1 on a failure")
    test.add_argument("name", nargs="?", default=None)
    test.set_defaults(handler=lambda args: asyncio.run(_providers_test(args.name)))

    secrets_parser = commands.add_parser("secrets", help="PROVIDER_SECRETS_KEY tools")
    secrets_commands = secrets_parser.add_subparsers(dest="action", required=True)
    secrets_commands.add_parser("rotate", help="re-encrypt stored secrets under the newest key")
    secrets_parser.set_defaults(handler=lambda _: asyncio.run(_rotate_secrets()))
    commands.add_parser(
        "secrets-key", help="print a new key for PROVIDER_SECRETS_KEY"
    ).set_defaults(handler=_secrets_key)

    receipts = commands.add_parser("receipts", help="receipts and credit notes")
    receipt_commands = receipts.add_subparsers(dest="action", required=True)
    receipt_commands.add_parser(
        "verify", help="check the hash chain and the stored PDFs; exit 1 on a mismatch"
    ).set_defaults(handler=lambda _: asyncio.run(_receipts_verify()))

    plans = commands.add_parser("plans", help="the recurring plans at the vendors")
    plan_commands = plans.add_subparsers(dest="action", required=True)
    plan_commands.add_parser(
        "sync", help="make vendor prices of every recurring plan; exit 1 on a failure"
    ).set_defaults(handler=lambda _: asyncio.run(_plans_sync()))

    mappings = commands.add_parser("provider-mappings", help="our IDs <-> the providers' IDs")
    mapping_commands = mappings.add_subparsers(dest="action", required=True)
    listing = mapping_commands.add_parser("list", help="every mapping of one provider")
    listing.add_argument("--provider", required=True)
    listing.add_argument("--entity", default="payment")
    listing.set_defaults(handler=lambda a: asyncio.run(_mappings_list(a.provider, a.entity)))
    lookup = mapping_commands.add_parser("lookup", help="e.g. lookup stripe payment pi_123")
    lookup.add_argument("provider")
    lookup.add_argument("entity")
    lookup.add_argument("id")
    lookup.set_defaults(handler=lambda a: asyncio.run(_mappings_lookup(a.provider, a.entity, a.id)))
    link = mapping_commands.add_parser(
        "link", help="e.g. link paddle plan pro pri_01h...: our ID -> the provider's"
    )
    link.add_argument("provider")
    link.add_argument("entity")
    link.add_argument("local_id")
    link.add_argument("external_id")
    link.set_defaults(
        handler=lambda a: asyncio.run(
            _mappings_link(a.provider, a.entity, a.local_id, a.external_id)
        )
    )

    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ValidationError as error:
        from app.settings import settings_problems

        problems = "".join(f"\n  {problem}" for problem in settings_problems(error))
        print(f"payments: invalid settings:{problems}", file=sys.stderr)
        return 2
    except SettingsError as error:  # a value that could not be parsed; names the setting only
        print(f"payments: invalid settings:\n  {error}", file=sys.stderr)
        return 2
    except ServiceError as error:
        print(f"payments: {error.code}: {error.detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
