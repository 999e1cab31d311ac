"""Health endpoints, settings safety and the API description."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.cli import main as cli_main
from app.security import decode_access_token
from app.settings import Settings, settings_problems
from tests.conftest import (
    JWT_SECRET,
    RedisServer,
    assert_problem,
    bearer,
    create_payment,
    make_settings,
    pay_in_sandbox,
)


class TestHealth:
    async def test_health_and_ready(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).json() == {"status": "ready"}

    async def test_admin_health(self, client: httpx.AsyncClient, token: Any) -> None:
        response = await client.get("/admin/health", headers=bearer(token("ops", admin=True)))
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "healthy"
        assert body["redis"]["status"] == "connected"
        assert body["providers"]["sandbox"]["status"] == "connected"
        assert body["providers"]["sandbox"]["latency_ms"] is not None
        # Each unconfigured provider says what would configure it.
        needs = {
            "stripe": "not configured: needs STRIPE_SECRET_KEY "
            "(environment or a stored configuration)",
            "googlepay": "not available on this service",
        }
        for name, message in needs.items():
            assert body["providers"][name] == {
                "provider": name,
                "status": "unconfigured",
                "configured": False,
                "latency_ms": None,
                "message": message,
                "breaker": None,
            }
        for name in ("paypal", "applepay"):
            assert body["providers"][name]["status"] == "unconfigured"
            assert body["providers"][name]["message"].startswith("not ")

    async def test_admin_health_is_for_admins(self, client: httpx.AsyncClient, token: Any) -> None:
        assert_problem(await client.get("/admin/health"), 401, "not_authenticated")
        assert_problem(
            await client.get("/admin/health", headers=bearer(token("alice"))), 403, "forbidden"
        )


SECRET = "recognisable-Qz7Kp4Wm9Xv2Lb8Nc5Rt1Yh6Jd3Fg0"


def _shares_a_run(text: str, secret: str, run: int = 6) -> bool:
    """True when ``text`` holds any ``run`` consecutive characters of ``secret``."""
    return any(secret[i : i + run] in text for i in range(len(secret) - run + 1))


class TestProductionSettings:
    def test_refuses_sandbox_and_weak_secret(self) -> None:
        with pytest.raises(ValidationError) as error:
            Settings(_env_file=None, environment="production")  # type: ignore[call-arg]
        message = str(error.value)
        assert "JWT_SECRET_KEY" in message and "sandbox" in message

    def test_refuses_unverifiable_webhooks(self) -> None:
        with pytest.raises(ValidationError, match="STRIPE_WEBHOOK_SECRET"):
            Settings(  # type: ignore[call-arg]
                _env_file=None,
                environment="production",
                jwt_secret_key=JWT_SECRET,
                payment_provider="stripe",
                stripe_secret_key="sk_live_x",
            )

    @pytest.mark.parametrize(
        "problem",
        [
            {"payment_provider": "sandbox"},  # the production check, a model validator
            {"payment_provider": "stripe", "stripe_secret_key": SECRET},
            {"port": f"port-{SECRET}"},  # a field's own type
            {"payment_plans": {"x": {"name": "X", "amount": 100, "currency": SECRET}}},
            {"sandbox_behaviour": {"fail": SECRET}},
            {"forwarded_allow_ips": SECRET},
        ],
        ids=["production", "webhook", "type", "plans", "sandbox", "proxies"],
    )
    def test_errors_name_the_problem_never_the_value(self, problem: dict[str, Any]) -> None:
        with pytest.raises(ValidationError) as error:
            Settings(  # type: ignore[call-arg]
                _env_file=None, environment="production", jwt_secret_key=SECRET, **problem
            )
        message = str(error.value)
        assert not _shares_a_run(message, SECRET), message
        assert not any(_shares_a_run(line, SECRET) for line in settings_problems(error.value))

    def test_the_problems_name_each_setting(self) -> None:
        with pytest.raises(ValidationError) as error:
            Settings(  # type: ignore[call-arg]
                _env_file=None, environment="production", port="x", reconcile_schedule="-1"
            )
        port, schedule = settings_problems(error.value)
        assert port.startswith("port: Input should be a valid integer")
        assert schedule == "reconcile_schedule: RECONCILE_SCHEDULE delays must be positive seconds"

    def test_secrets_are_not_printed(self) -> None:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, jwt_secret_key=JWT_SECRET, stripe_secret_key="sk_test_hidden"
        )
        assert "sk_test_hidden" not in repr(settings) and JWT_SECRET not in repr(settings)

    @pytest.mark.parametrize(
        "plans",
        [
            '{"x": {"name": "X", "amount": 0, "currency": "EUR"}}',
            '{"x": {"name": "X", "amount": 100, "currency": "euro"}}',
            "{}",
            "not json",
        ],
    )
    def test_bad_payment_plans(self, plans: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PAYMENT_PLANS", plans)
        with pytest.raises((ValidationError, SettingsError)):
            Settings(_env_file=None)  # type: ignore[call-arg]


class TestSandboxInProduction:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        # Production with another default provider: the sandbox must still refuse.
        return {
            "environment": "production",
            "payment_provider": "paypal",
            "jwt_secret_key": JWT_SECRET,
        }

    async def test_sandbox_refuses_to_run(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "pro", "provider": "sandbox"}
        )
        assert_problem(response, 503, "provider_not_configured")
        assert_problem(
            await client.get("/sandbox/checkout/sb_0123456789ab"), 503, "provider_not_configured"
        )


class TestCli:
    def test_token(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("JWT_SECRET_KEY", JWT_SECRET)
        assert cli_main(["token", "--sub", "alice", "--admin"]) == 0
        printed = capsys.readouterr().out.strip()
        user = decode_access_token(Settings(_env_file=None, jwt_secret_key=JWT_SECRET), printed)  # type: ignore[call-arg]
        assert (user.sub, user.is_admin) == ("alice", True)


class TestServe:
    """`payments serve` hands uvicorn the proxies the app trusts, so that the two never read
    X-Forwarded-For differently (uvicorn alone would trust any loopback peer)."""

    @pytest.fixture
    def started(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> Callable[[], dict[str, Any]]:
        monkeypatch.chdir(tmp_path)  # no .env
        monkeypatch.setenv("JWT_SECRET_KEY", JWT_SECRET)
        calls: list[dict[str, Any]] = []
        monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))

        def serve() -> dict[str, Any]:
            assert cli_main(["serve"]) == 0
            return calls[-1]

        return serve

    def test_workers_from_web_concurrency(
        self, started: Callable[[], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
        assert started()["workers"] == 1
        monkeypatch.setenv("WEB_CONCURRENCY", "3")
        assert started()["workers"] == 3

    def test_no_proxy_is_trusted_by_default(
        self, started: Callable[[], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
        assert started()["proxy_headers"] is False

    def test_the_listed_proxies_are_uvicorns_too(
        self, started: Callable[[], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8, 192.0.2.7")
        options = started()
        assert options["proxy_headers"] is True
        assert options["forwarded_allow_ips"] == "10.0.0.0/8,192.0.2.7/32"


class TestApiDescription:
    @pytest.mark.parametrize("path", ["/docs", "/redoc"])
    async def test_doc_pages_load_only_our_own_assets(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        page = await client.get(path)
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)=["\']([^"\']+)', page.text)
        assert assets and all(asset.startswith("/docs/assets/") for asset in assets), assets
        for asset in assets:
            served = await client.get(asset)
            assert served.status_code == 200 and len(served.content) > 1000, asset
            assert served.headers["cache-control"] == "public, max-age=86400"

    async def test_the_document_says_what_is_answered(self, client: httpx.AsyncClient) -> None:
        schema = (await client.get("/openapi.json")).json()
        create = schema["paths"]["/api/v1/payment/create-intent"]["post"]
        # A token is optional here, required for a receipt.
        assert create["security"] == [{"HTTPBearer": []}, {}]
        receipt = schema["paths"]["/api/v1/payment/receipt/{payment_id}"]["get"]
        assert receipt["security"] == [{"HTTPBearer": []}]
        webhook = schema["paths"]["/api/v1/payment/webhook/{provider}"]["post"]
        assert webhook["security"] == []  # the sender's signature, never our token
        # Every error is a problem document; a body can be malformed, too large or invalid.
        for status in ("400", "413", "422"):
            assert create["responses"][status]["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
        assert "HTTPValidationError" not in schema["components"]["schemas"]
        # The plans and providers this deployment has.
        body = schema["components"]["schemas"]["CreateIntentRequest"]["properties"]
        assert body["plan"]["enum"] == ["basic", "expert", "pro"]
        assert {"sandbox", "stripe", "paypal"} <= set(body["provider"]["anyOf"][0]["enum"])

    async def test_no_other_file_is_served_as_an_asset(self, client: httpx.AsyncClient) -> None:
        for name in ("__init__.py", "..%2F__init__.py", "core.py"):
            assert_problem(await client.get(f"/docs/assets/{name}"), 404, "not_found")

    async def test_docs_and_schema(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/docs")).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        paths = schema["paths"]
        for path in (
            "/api/v1/payment/create-intent",
            "/api/v1/payment/verify",
            "/api/v1/payment/receipt/{payment_id}",
            "/api/v1/payment/receipt/{payment_id}/pdf",
            "/api/v1/payment/webhook/{provider}",
            "/api/v1/payment/capture/paypal/{payment_id}",
            "/api/v1/payment/{payment_id}/refund",
            "/health",
            "/ready",
            "/admin/health",
        ):
            assert path in paths, path
        create = paths["/api/v1/payment/create-intent"]["post"]["responses"]
        assert {"201", "401", "422", "429", "503"} <= set(create)
        assert "Problem" in schema["components"]["schemas"]


def test_no_generated_files_are_tracked() -> None:
    root = Path(__file__).resolve().parent.parent
    ignored = (root / ".gitignore").read_text()
    for pattern in ("*.pdf", ".venv/", "var/", ".env"):
        assert pattern in ignored


async def test_the_collector_is_tuned_while_the_app_runs_and_restored_after(
    settings: Settings, render_pool: Any
) -> None:
    from app.main import GC_YOUNG_THRESHOLD, create_app

    before = gc.get_threshold()
    application = create_app(settings, receipt_executor=render_pool)
    async with application.router.lifespan_context(application):
        # Start-up's objects are out of the collector's sight; traffic alone does not
        # reach the first threshold.
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


class TestUnwritableReceiptsDirectory:
    """RECEIPTS_DIR that cannot take a file (here a path under a plain file, which stops root
    too): found by /ready at once, never a 500 at the first PDF."""

    @pytest.fixture
    def settings(self, redis_server: RedisServer, tmp_path: Path) -> Settings:
        redis_server.flush()
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        return make_settings(redis_server.url, blocker / "receipts")

    async def test_ready_fails_with_the_reason(self, client: httpx.AsyncClient) -> None:
        body = assert_problem(await client.get("/ready"), 503, "receipt_storage_unavailable")
        assert "RECEIPTS_DIR" in body["detail"]

    async def test_admin_health_is_degraded_and_says_why(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        response = await client.get("/admin/health", headers=bearer(token("ops", admin=True)))
        assert response.json()["status"] == "degraded"
        assert "cannot be written" in response.json()["receipts"]["storage"]

    async def test_a_pdf_is_a_503_never_a_500(self, client: httpx.AsyncClient, token: Any) -> None:
        alice = token("alice")
        created = await create_payment(client, token=alice)
        await pay_in_sandbox(client, created["payment_id"])
        response = await client.get(
            f"/api/v1/payment/receipt/{created['payment_id']}/pdf", headers=bearer(alice)
        )
        assert_problem(response, 503, "receipt_storage_unavailable")
        assert response.headers["retry-after"] == "30"
