"""Third-party providers: a package that registers a provider under the entry-point group
``payment_service.providers`` appears in the service, with no edit of the service's code.

The example package in examples/acme_provider is installed the way pip would leave it, without
touching the venv: the package, and a ``<name>-<version>.dist-info`` folder holding the two
files ``importlib.metadata`` reads (METADATA and entry_points.txt), in a temporary directory
that is put on the path. The entry points come from the example's own pyproject.toml.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.fernet import Fernet

from app.main import create_app
from app.settings import Settings
from services.payment_providers.factory import BUILTIN_PROVIDERS, ENTRY_POINT_GROUP
from tests.conftest import JWT_SECRET, RedisServer, assert_problem, bearer, create_payment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "acme_provider"
ACME_KEY = "acme_test_key_0123456789"

# Plug-ins that are wrong in each way the factory guards against.
BROKEN_PLUGINS = {
    "missing": "acme_missing_module:MissingProvider",  # the module is not there
    "not_a_class": "acme_provider:API_KEY_VARIABLE",  # a string, not a provider class
    "impostor": "services.payment_providers.sandbox:SandboxProvider",  # "sandbox" is taken
}


def install_distribution(
    site: Path, name: str, version: str, entry_points: Mapping[str, str]
) -> None:
    """The metadata pip leaves for an installed distribution, as far as entry points go."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{key} = {value}" for key, value in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def install_example(site: Path) -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(
        EXAMPLE / "acme_provider",
        site / "acme_provider",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    install_distribution(
        site, project["name"], project["version"], project["entry-points"][ENTRY_POINT_GROUP]
    )


@pytest.fixture
def broken_plugins() -> dict[str, str]:
    """Entry points of a second, broken distribution installed beside the example."""
    return {}


@pytest.fixture
def site(tmp_path: Path, broken_plugins: dict[str, str]) -> Path:
    site = tmp_path / "site-packages"
    install_example(site)
    if broken_plugins:
        install_distribution(site, "payment-service-broken", "0.1.0", broken_plugins)
    return site


def run_cli(
    redis_server: RedisServer,
    *args: str,
    cwd: Path,
    site: Path | None = None,
    acme_key: str | None = ACME_KEY,
) -> subprocess.CompletedProcess[str]:
    """``python -m app.cli ...`` with ``site`` on its path. ``cwd`` is a directory with no .env,
    so that the developer's own settings do not leak in."""
    env = {name: value for name, value in os.environ.items() if name != "ACME_API_KEY"}
    env |= {
        "PYTHONPATH": os.pathsep.join(str(path) for path in (site, ROOT) if path is not None),
        "REDIS_URL": redis_server.url,
        "REDIS_KEY_PREFIX": "test:",
        "JWT_SECRET_KEY": JWT_SECRET,
    }
    if acme_key is not None:
        env["ACME_API_KEY"] = acme_key
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(stdout: str) -> dict[str, list[str]]:
    """`payments providers list` as {name: the other columns}."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines()[1:] if line}


class TestInstalledPackage:
    """What an operator sees from the command line after `pip install payment-service-acme`."""

    @pytest.fixture(autouse=True)
    def _clean(self, redis_server: RedisServer) -> None:
        redis_server.flush()  # no stored configuration left by another test

    def test_listed_with_its_prefix_once_installed(
        self, site: Path, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        before = run_cli(redis_server, "providers", "list", cwd=tmp_path)
        assert before.returncode == 0, before.stderr
        assert "acme" not in listed(before.stdout), "payment-service-acme is installed here"

        after = run_cli(redis_server, "providers", "list", cwd=tmp_path, site=site)
        assert after.returncode == 0, after.stderr
        providers = listed(after.stdout)
        assert providers["acme"] == ["true", "true", "acme_", "card,redirect"]
        assert set(BUILTIN_PROVIDERS) < set(providers)

    def test_health_check_passes_when_configured(
        self, site: Path, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        done = run_cli(redis_server, "providers", "test", "acme", cwd=tmp_path, site=site)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("acme: ok example provider")

        everything = run_cli(redis_server, "providers", "test", cwd=tmp_path, site=site)
        assert everything.returncode == 0, everything.stdout + everything.stderr
        assert "acme: ok" in everything.stdout and "sandbox: ok" in everything.stdout

    def test_health_check_fails_without_its_key(
        self, site: Path, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        done = run_cli(
            redis_server, "providers", "test", "acme", cwd=tmp_path, site=site, acme_key=None
        )
        assert done.returncode == 1
        assert done.stdout.strip() == "acme: FAIL not configured or deactivated"
        listing = run_cli(redis_server, "providers", "list", cwd=tmp_path, site=site, acme_key=None)
        assert listed(listing.stdout)["acme"][:2] == ["false", "false"]  # configured, active


@pytest.fixture
def acme_key() -> str | None:
    return ACME_KEY


@pytest.fixture
def on_path(site: Path, acme_key: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example importable in this process, as if installed; undone afterwards."""
    # syspath_prepend also calls importlib.invalidate_caches(), which drops the cached
    # directory listings importlib.metadata keeps per path entry.
    monkeypatch.syspath_prepend(site)
    if acme_key is None:
        monkeypatch.delenv("ACME_API_KEY", raising=False)
    else:
        monkeypatch.setenv("ACME_API_KEY", acme_key)
    try:
        yield site
    finally:
        for name in [name for name in sys.modules if name.partition(".")[0] == "acme_provider"]:
            del sys.modules[name]


@pytest.fixture
async def app(
    on_path: Path, settings: Settings, render_pool: ProcessPoolExecutor
) -> AsyncIterator[Any]:
    """The real app, built after the example is on the path (providers are found at start)."""
    application = create_app(settings, receipt_executor=render_pool)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


class TestInTheService:
    async def test_listed_by_the_admin_api(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.get("/api/v1/providers", headers=admin)
        assert response.status_code == 200, response.text
        acme = {item["name"]: item for item in response.json()}["acme"]
        assert acme == {
            "name": "acme",
            "display_name": "Acme Pay",
            "service_type": "payment",
            "id_prefixes": ["acme_"],
            "capabilities": ["card", "redirect"],
            "configured": True,
            "active": True,
            "default": False,
            "breaker": "closed",
        }
        schema = await client.get("/api/v1/providers/acme/schema", headers=admin)
        assert schema.status_code == 200, schema.text
        assert set(schema.json()["config_secret"]["properties"]) == {"api_key"}

    async def test_a_payment_routes_to_it_and_verify_finds_it_by_prefix(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        user = token("alice")
        created = await create_payment(client, provider="acme", token=user)
        assert created["payment_id"].startswith("acme_")
        assert created["provider"] == "acme"
        assert created["status"] == "pending"
        assert created["redirect_url"] == f"http://testserver/acme/checkout/{created['payment_id']}"

        verified = await client.post(
            "/api/v1/payment/verify",
            json={"payment_id": created["payment_id"]},
            headers=bearer(user),
        )
        assert verified.status_code == 200, verified.text
        assert verified.json()["provider"] == "acme"
        assert verified.json()["status"] == "pending"

    async def test_an_operation_it_lacks_is_not_supported(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        user = token("alice")
        created = await create_payment(client, provider="acme", token=user)
        response = await client.post(
            f"/api/v1/payment/{created['payment_id']}/capture", headers=bearer(user)
        )
        body = assert_problem(response, 422, "operation_not_supported")
        assert body["detail"] == "acme does not support capture"

    async def test_a_stored_configuration_is_checked_and_can_deactivate_it(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        refused = await client.post(
            "/api/v1/providers/configs",
            json={"provider_key": "acme", "config_secret": {"api_key": "k"}},  # too short
            headers=admin,
        )
        assert_problem(refused, 422, "invalid_provider_config")
        assert "config_secret.api_key" in refused.json()["detail"]

        stored = await client.post(
            "/api/v1/providers/configs",
            json={"provider_key": "acme", "active": False},
            headers=admin,
        )
        assert stored.status_code == 201, stored.text
        assert_problem(
            await client.post(
                "/api/v1/payment/create-intent", json={"plan": "pro", "provider": "acme"}
            ),
            503,
            "provider_not_configured",
        )


class TestInTheServiceWithoutItsKey:
    @pytest.fixture
    def acme_key(self) -> str | None:
        return None

    async def test_listed_as_not_configured_and_refuses_payments(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.get("/api/v1/providers", headers=admin)
        acme = {item["name"]: item for item in response.json()}["acme"]
        assert (acme["configured"], acme["active"]) == (False, False)
        body = assert_problem(
            await client.post(
                "/api/v1/payment/create-intent", json={"plan": "pro", "provider": "acme"}
            ),
            503,
            "provider_not_configured",
        )
        assert body["detail"] == "The acme provider is not configured on this service"


class TestInTheServiceWithAStoredKey:
    """A plug-in's configuration is stored like a built-in's: the key an operator stores
    configures it, with no ACME_API_KEY in the environment."""

    @pytest.fixture
    def acme_key(self) -> str | None:
        return None

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"provider_secrets_key": Fernet.generate_key().decode()}

    async def test_configured_by_what_is_stored(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        stored = await client.post(
            "/api/v1/providers/configs",
            json={"provider_key": "acme", "config_secret": {"api_key": ACME_KEY}},
            headers=admin,
        )
        assert stored.status_code == 201, stored.text
        assert ACME_KEY not in stored.text
        response = await client.get("/api/v1/providers", headers=admin)
        acme = {item["name"]: item for item in response.json()}["acme"]
        assert (acme["configured"], acme["active"]) == (True, True)
        created = await create_payment(client, provider="acme")
        assert created["payment_id"].startswith("acme_")


@pytest.fixture
def provider_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of ``payments.providers``, captured on that logger: the app's logging setup
    stops ``payments`` propagating to the root, where caplog listens."""
    logger = logging.getLogger("payments.providers")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


class TestBrokenPlugins:
    """A plug-in that does not load, is not a provider, or takes a built-in's name is logged
    and left out; the service starts and every other provider works."""

    @pytest.fixture
    def broken_plugins(self) -> dict[str, str]:
        return BROKEN_PLUGINS

    async def test_the_service_starts_without_them(
        self,
        provider_logs: pytest.LogCaptureFixture,  # first: it must listen before the app starts
        client: httpx.AsyncClient,
        admin: dict[str, str],
    ) -> None:
        response = await client.get("/api/v1/providers", headers=admin)
        assert response.status_code == 200, response.text
        names = [item["name"] for item in response.json()]
        assert sorted(names) == sorted([*BUILTIN_PROVIDERS, "acme"])
        # Providers are discovered while the app starts: in this test's setup.
        events = {record.getMessage(): record for record in provider_logs.get_records("setup")}
        assert events["provider.plugin_load_failed"].__dict__["entry_point"] == "missing"
        assert events["provider.plugin_invalid"].__dict__["entry_point"] == "not_a_class"
        assert events["provider.plugin_name_taken"].__dict__["provider"] == "sandbox"

        sandbox = await create_payment(client)
        assert sandbox["provider"] == "sandbox"
        acme = await create_payment(client, provider="acme")
        assert acme["payment_id"].startswith("acme_")

    def test_the_cli_lists_the_others(
        self, site: Path, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        redis_server.flush()
        done = run_cli(redis_server, "providers", "list", cwd=tmp_path, site=site)
        assert done.returncode == 0, done.stderr
        assert set(listed(done.stdout)) == {*BUILTIN_PROVIDERS, "acme"}
        assert "provider.plugin_load_failed" in done.stderr


class TestRoutingByCurrency:
    """Acme charges EUR and USD only (its ``currencies``); the sandbox charges any."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "payment_provider": "acme",
            "payment_fallback": ["sandbox"],
            "payment_plans": {
                "pro": {"name": "Pro", "prices": {"EUR": 2900, "USD": 3100, "NGN": 4500000}}
            },
        }

    async def test_the_default_takes_the_currencies_it_charges(
        self, client: httpx.AsyncClient
    ) -> None:
        created = await create_payment(client, currency="usd")
        assert (created["provider"], created["amount"], created["currency"]) == (
            "acme",
            3100,
            "USD",
        )

    async def test_a_currency_the_default_cannot_charge_goes_to_the_fallback(
        self, client: httpx.AsyncClient
    ) -> None:
        created = await create_payment(client, currency="NGN")
        assert (created["provider"], created["amount"], created["currency"]) == (
            "sandbox",
            4500000,
            "NGN",
        )

    async def test_a_named_provider_that_cannot_charge_it_is_refused(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "currency": "NGN", "provider": "acme"},
        )
        body = assert_problem(response, 422, "currency_not_supported")
        assert (body["currency"], body["provider"]) == ("NGN", "acme")

    async def test_the_plans_say_who_takes_each_currency(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v1/payment/plans")
        prices = {price["currency"]: price for price in response.json()["plans"][0]["prices"]}
        assert prices["EUR"]["providers"] == ["acme", "sandbox"]
        assert prices["NGN"]["providers"] == ["sandbox"]


class TestNoProviderForTheCurrency:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "payment_provider": "acme",
            "payment_fallback": [],
            "payment_plans": {"pro": {"name": "Pro", "prices": {"EUR": 2900, "NGN": 4500000}}},
        }

    async def test_refused_never_charged_in_another_currency(
        self, client: httpx.AsyncClient, redis_server: RedisServer
    ) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "pro", "currency": "ngn"}
        )
        body = assert_problem(response, 422, "currency_not_supported")
        assert (body["currency"], body["provider"]) == ("NGN", "acme")
        stored = redis.Redis(port=redis_server.port)
        try:
            assert stored.keys("test:pay:*") == []
        finally:
            stored.close()
