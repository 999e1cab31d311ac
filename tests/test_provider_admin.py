"""The provider platform: stored configurations with encrypted secrets, hot swap across
workers, run-time routing. Over the real app and Redis; two app instances stand in for two
worker processes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from pydantic import SecretStr, ValidationError

from app.main import create_app
from app.settings import Settings
from services.payment_providers.factory import PaymentProviderFactory
from services.payment_providers.placeholders import GooglePayProvider
from services.payment_providers.sandbox_webhooks import sign_webhook
from services.provider_configs import ProviderConfigStore, RoutingConfig, SecretBox
from services.provider_manager import StoredConfigsUnreadable
from tests.conftest import RedisServer, assert_problem, bearer, create_payment

KEY = Fernet.generate_key().decode()
NEW_SECRET = "rotated-sandbox-secret-0123456789"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"provider_secrets_key": KEY, "rate_limits_enabled": False}


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


@pytest.fixture
async def second_worker(
    settings: Settings, render_pool: ProcessPoolExecutor
) -> AsyncIterator[httpx.AsyncClient]:
    other = create_app(settings, receipt_executor=render_pool)
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://w2") as client:
            yield client


async def _signed_webhook(
    client: httpx.AsyncClient, secret: str, payment_id: str
) -> httpx.Response:
    body = json.dumps(
        {
            "id": f"evt_{time.time_ns()}",
            "type": "payment.succeeded",
            "data": {"payment_id": payment_id},
        }
    ).encode()
    return await client.post(
        "/api/v1/payment/webhook/sandbox",
        content=body,
        headers={"Sandbox-Signature": sign_webhook(secret, body)},
    )


async def _eventually(check: Any, within_s: float = 1.0) -> float:
    """Seconds until ``check()`` is true; fails after ``within_s``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within_s:
            pytest.fail(f"not true within {within_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class TestAccess:
    @pytest.mark.parametrize(
        "path",
        [
            "/api/v1/providers",
            "/api/v1/providers/configs",
            "/api/v1/providers/routing",
            "/api/v1/providers/stripe/schema",
        ],
    )
    async def test_admins_only(self, client: httpx.AsyncClient, token: Any, path: str) -> None:
        assert_problem(await client.get(path), 401, "not_authenticated")
        assert_problem(await client.get(path, headers=bearer(token("alice"))), 403, "forbidden")


class TestDescription:
    async def test_list(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        providers = {
            p["name"]: p for p in (await client.get("/api/v1/providers", headers=admin)).json()
        }
        assert set(providers) >= {
            "sandbox",
            "stripe",
            "paypal",
            "mobilepay",
            "googlepay",
            "applepay",
        }
        sandbox = providers["sandbox"]
        assert (sandbox["configured"], sandbox["active"], sandbox["default"]) == (True, True, True)
        assert sandbox["id_prefixes"] == ["sb_"] and "refund" in sandbox["capabilities"]
        assert sandbox["breaker"] == "closed"
        assert providers["stripe"]["configured"] is False

    async def test_schema(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        schema = (await client.get("/api/v1/providers/sandbox/schema", headers=admin)).json()
        assert "webhook_secret" in schema["config_secret"]["properties"]
        assert_problem(
            await client.get("/api/v1/providers/nope/schema", headers=admin),
            422,
            "unknown_provider",
        )


class TestStoredConfigs:
    async def test_secrets_are_encrypted_and_never_shown(
        self, client: httpx.AsyncClient, admin: dict[str, str], redis_server: RedisServer
    ) -> None:
        created = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}},
        )
        assert created.status_code == 201, created.text
        assert created.json()["config_secret"] == {"webhook_secret": "********"}
        for response in (
            created,
            await client.get("/api/v1/providers/configs", headers=admin),
            await client.get(f"/api/v1/providers/configs/{created.json()['id']}", headers=admin),
        ):
            assert NEW_SECRET not in response.text
        raw = redis.Redis(port=redis_server.port)
        try:
            stored = b"".join(raw.hvals("test:provider_configs"))
        finally:
            raw.close()
        assert NEW_SECRET.encode() not in stored and b"gAAAAA" in stored  # a Fernet token

    async def test_bad_values_name_the_field_without_echoing_it(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={
                "provider_key": "sandbox",
                "config_secret": {"webhook_secret": "short-s3cret"},
                "capabilities": ["webhooks", "embedded"],
            },
        )
        body = assert_problem(response, 422, "invalid_provider_config")
        assert "config_secret.webhook_secret" in body["detail"] and "capabilities" in body["detail"]
        assert "short-s3cret" not in response.text
        unknown = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"password": "x" * 20}},
        )
        assert "x" * 20 not in unknown.text
        assert_problem(unknown, 422, "invalid_provider_config")

    async def test_a_secret_no_header_can_carry_is_refused_not_a_500_later(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        # A placeholder pasted as it was ("sk_test_51…your key…"): stored, it made every
        # Stripe call fail encoding the Authorization header, create-intent a 500.
        response = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={
                "provider_key": "stripe",
                "config_secret": {
                    "secret_key": "sk_test_51…your key…",
                    "webhook_secret": "whsec_ok",
                },
            },
        )
        body = assert_problem(response, 422, "invalid_provider_config")
        assert body["detail"] == "Invalid fields: config_secret.secret_key"
        assert "your key" not in response.text
        listed = await client.get("/api/v1/providers/configs", headers=admin)
        assert listed.json() == []

    async def test_one_config_per_provider(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        body = {"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}}
        assert (
            await client.post("/api/v1/providers/configs", headers=admin, json=body)
        ).status_code == 201
        again = await client.post("/api/v1/providers/configs", headers=admin, json=body)
        assert_problem(again, 409, "provider_config_exists")

    async def test_unknown_ids(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        assert_problem(
            await client.get("/api/v1/providers/configs/pc_0000000000000000", headers=admin),
            404,
            "provider_config_not_found",
        )
        assert_problem(
            await client.delete("/api/v1/providers/configs/nonsense", headers=admin),
            422,
            "validation_error",
        )


class TestEnvironmentOnlyFields:
    """An API base address comes from the environment only: whoever could store one could
    send our secret key to another host."""

    async def test_a_stored_api_base_is_refused(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={
                "provider_key": "stripe",
                "config": {"api_base": "https://collector.example"},
                "config_secret": {"secret_key": "sk_test_stored0123456789"},
            },
        )
        body = assert_problem(response, 422, "invalid_provider_config")
        assert body["detail"] == "Invalid fields: config.api_base"
        assert "collector.example" not in response.text

    async def test_the_schema_says_it_is_read_only(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        for provider in ("stripe", "paypal"):
            schema = await client.get(f"/api/v1/providers/{provider}/schema", headers=admin)
            assert schema.json()["config"]["properties"]["api_base"]["readOnly"] is True


class TestHotSwap:
    async def test_new_secret_reaches_every_worker_within_a_second(
        self, client: httpx.AsyncClient, second_worker: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment = await create_payment(client)
        created = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}},
        )
        assert created.status_code == 201
        # The worker that stored it: at once.
        assert (await _signed_webhook(client, NEW_SECRET, payment["payment_id"])).status_code == 200

        async def second_uses_new_secret() -> bool:
            response = await _signed_webhook(second_worker, NEW_SECRET, payment["payment_id"])
            return response.status_code == 200

        await _eventually(second_uses_new_secret, within_s=1.0)
        old = await _signed_webhook(second_worker, "sandbox-webhook-secret", payment["payment_id"])
        assert_problem(old, 400, "invalid_signature")

    async def test_deactivate_and_activate(
        self, client: httpx.AsyncClient, second_worker: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        created = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}},
        )
        config_id = created.json()["id"]
        patched = await client.patch(
            f"/api/v1/providers/configs/{config_id}", headers=admin, json={"active": False}
        )
        assert patched.json()["active"] is False
        refused = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        assert "deactivated" in assert_problem(refused, 503, "provider_not_configured")["detail"]

        async def second_refuses() -> bool:
            response = await second_worker.post(
                "/api/v1/payment/create-intent", json={"plan": "pro"}
            )
            return response.status_code == 503

        await _eventually(second_refuses)
        await client.patch(
            f"/api/v1/providers/configs/{config_id}", headers=admin, json={"active": True}
        )
        assert (
            await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        ).status_code == 201
        # Deleting the stored config goes back to the environment's settings.
        assert (
            await client.delete(f"/api/v1/providers/configs/{config_id}", headers=admin)
        ).status_code == 204
        payment = await create_payment(client)
        back = await _signed_webhook(client, "sandbox-webhook-secret", payment["payment_id"])
        assert back.status_code == 200

    async def test_requests_in_flight_survive_swaps(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        created = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}},
        )
        config_id = created.json()["id"]

        async def flip() -> None:
            for index in range(10):
                await client.patch(
                    f"/api/v1/providers/configs/{config_id}",
                    headers=admin,
                    json={"config_secret": {"webhook_secret": f"{NEW_SECRET}-{index}"}},
                )

        results = await asyncio.gather(
            flip(),
            *(
                client.post(
                    "/api/v1/payment/create-intent",
                    json={"plan": "pro", "sandbox": {"delay_ms": 50}},
                )
                for _ in range(20)
            ),
        )
        assert [r.status_code for r in results[1:]] == [201] * 20


class TestRouting:
    async def test_switch_default_and_fallback_at_run_time(
        self, client: httpx.AsyncClient, app: Any, admin: dict[str, str]
    ) -> None:
        body = {"default": "mobilepay", "fallback": ["sandbox"]}
        refused = await client.put("/api/v1/providers/routing", headers=admin, json=body)
        assert assert_problem(refused, 422, "provider_not_configured")["provider"] == "mobilepay"
        routing = await client.put(
            "/api/v1/providers/routing", headers=admin, json=body, params={"force": "true"}
        )
        assert routing.json()["default"] == "mobilepay"
        created = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        record = await app.state.store.get(created.json()["payment_id"])
        assert [(a.provider, a.outcome) for a in record.attempts] == [
            ("mobilepay", "skipped"),
            ("sandbox", "succeeded"),
        ]
        health = await client.get("/admin/health", headers=admin)
        # The default cannot take payments, the fallback does: degraded, and why.
        assert (health.status_code, health.json()["status"]) == (200, "degraded")
        assert health.json()["providers"]["mobilepay"]["message"].startswith("not ")

        alone = await client.put(
            "/api/v1/providers/routing",
            headers=admin,
            json={"default": "mobilepay", "fallback": []},
            params={"force": "true"},
        )
        assert alone.status_code == 200
        health = await client.get("/admin/health", headers=admin)
        assert (health.status_code, health.json()["status"]) == (503, "unhealthy")

    @pytest.mark.parametrize(
        "body",
        [
            {"default": "bitcoin"},
            {"weights": {"sandbox": 0}},
            {"weights": {"sandbox": -1, "stripe": 5}},
        ],
    )
    async def test_bad_routing(
        self, client: httpx.AsyncClient, admin: dict[str, str], body: dict[str, Any]
    ) -> None:
        response = await client.put("/api/v1/providers/routing", headers=admin, json=body)
        assert response.status_code == 422


class TestWeightedSplit:
    def test_split_is_sticky_and_proportional(self) -> None:
        providers = [GooglePayProvider(), type("Other", (GooglePayProvider,), {"name": "other"})()]
        factory = PaymentProviderFactory.create(
            providers,
            production=False,
            default="googlepay",
            fallback=[],
            weights={"googlepay": 70, "other": 30},
        )
        picks = Counter(
            factory.route(None, currency="EUR", customer=f"c{n}")[0].name for n in range(2000)
        )
        assert 0.65 < picks["googlepay"] / 2000 < 0.75
        assert {
            factory.route(None, currency="EUR", customer="alice")[0].name for _ in range(20)
        } == {factory.route(None, currency="EUR", customer="alice")[0].name}


class TestKeyRotation:
    def test_old_keys_still_decrypt_and_rotate_moves_to_the_newest(self) -> None:
        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        token = SecretBox(old).encrypt({"secret_key": "sk_test_123"})
        rotated_box = SecretBox(f"{new},{old}")
        assert rotated_box.decrypt(token) == {"secret_key": "sk_test_123"}
        rotated = rotated_box.rotate(token)
        assert SecretBox(new).decrypt(rotated) == {"secret_key": "sk_test_123"}


class TestNoSecretsKey:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {}

    async def test_secrets_need_a_key(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config_secret": {"webhook_secret": NEW_SECRET}},
        )
        assert_problem(response, 503, "secrets_key_missing")
        assert NEW_SECRET not in response.text


class TestSandboxFaultsByConfig:
    """An operator rehearses a provider outage without touching any client: the sandbox's
    stored config gives every payment that brings no `sandbox` object of its own a fault."""

    async def test_stored_behaviour_reaches_every_worker_and_goes_again(
        self,
        client: httpx.AsyncClient,
        second_worker: httpx.AsyncClient,
        admin: dict[str, str],
    ) -> None:
        url = "/api/v1/payment/create-intent"
        stored = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config": {"behaviour": {"fail": "decline"}}},
        )
        assert stored.status_code == 201, stored.text
        assert stored.json()["config"]["behaviour"]["fail"] == "decline"

        async def declined_everywhere() -> bool:
            answers = [await c.post(url, json={"plan": "pro"}) for c in (client, second_worker)]
            return all(a.status_code == 402 for a in answers)

        await _eventually(declined_everywhere)
        assert_problem(await second_worker.post(url, json={"plan": "pro"}), 402, "payment_declined")
        # A payment that asks for its own behaviour keeps it.
        own = await client.post(url, json={"plan": "pro", "sandbox": {"delay_ms": 0}})
        assert own.status_code == 201, own.text

        cleared = await client.patch(
            f"/api/v1/providers/configs/{stored.json()['id']}",
            headers=admin,
            json={"config": {}},
        )
        assert cleared.status_code == 200, cleared.text

        async def accepted_everywhere() -> bool:
            answers = [await c.post(url, json={"plan": "pro"}) for c in (client, second_worker)]
            return all(a.status_code == 201 for a in answers)

        await _eventually(accepted_everywhere)

    async def test_a_bad_behaviour_is_refused_naming_the_field(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        refused = await client.post(
            "/api/v1/providers/configs",
            headers=admin,
            json={"provider_key": "sandbox", "config": {"behaviour": {"fail": "explode"}}},
        )
        body = assert_problem(refused, 422, "invalid_provider_config")
        assert "behaviour" in json.dumps(body)

    @pytest.mark.parametrize("raw", ['{"fail": "explode"}', '{"delay_ms": -1}', "[1]"])
    def test_a_bad_environment_value_is_refused_at_start(
        self, raw: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SANDBOX_BEHAVIOUR", raw)
        with pytest.raises(ValueError, match="sandbox_behaviour"):
            Settings(_env_file=None)  # type: ignore[call-arg]

    def test_the_environment_can_set_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SANDBOX_BEHAVIOUR", '{"fail": "unavailable", "delay_ms": 5}')
        behaviour = Settings(_env_file=None).sandbox_behaviour  # type: ignore[call-arg]
        assert behaviour is not None
        assert (behaviour["fail"], behaviour["delay_ms"]) == ("unavailable", 5)


class TestEnvironmentValues:
    async def test_a_bad_value_stops_the_start_naming_the_setting_not_the_value(
        self, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        bad = settings.model_copy(update={"stripe_publishable_key": "pk_live_Qz7Kp4-Wm9Xv2"})
        with pytest.raises(ValidationError) as refused:
            async with _running(bad, render_pool):
                pytest.fail("started")
        assert [error["loc"] for error in refused.value.errors()] == [("stripe_publishable_key",)]
        assert "Qz7Kp4" not in str(refused.value)

    async def test_a_secret_no_header_can_carry_stops_the_start(
        self, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        bad = settings.model_copy(update={"stripe_secret_key": SecretStr("sk_test_Qz7…")})
        with pytest.raises(ValidationError) as refused:
            async with _running(bad, render_pool):
                pytest.fail("started")
        assert [error["loc"] for error in refused.value.errors()] == [("stripe_secret_key",)]
        assert "Qz7" not in str(refused.value)


class TestStoredConfigThatNoLongerFits:
    """A stored configuration that its provider's models refuse (written by another release,
    or around the admin API) holds the provider out, and health says which fields."""

    async def test_its_provider_is_held_out_and_health_says_why(
        self,
        settings: Settings,
        redis_server: RedisServer,
        render_pool: ProcessPoolExecutor,
        admin: dict[str, str],
    ) -> None:
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await ProviderConfigStore(raw, prefix="test:", box=SecretBox(KEY)).create(
                provider_key="sandbox",
                service_type="payment",
                config={"behaviour": {"fail": "explode"}},
                secrets_={},
                capabilities=None,
            )
        finally:
            await raw.aclose()
        async with _running(settings, render_pool) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                health = await client.get("/admin/health", headers=admin)
                refused = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        sandbox = health.json()["providers"]["sandbox"]
        assert (sandbox["status"], sandbox["configured"]) == ("error", False)
        assert "config.behaviour.fail" in sandbox["message"]
        assert health.status_code == 503  # the default provider cannot take payments
        assert_problem(refused, 503, "provider_not_configured")


OTHER_KEY = Fernet.generate_key().decode()
STRIPE_SECRETS = {"secret_key": "sk_test_stored0123456789", "webhook_secret": "whsec_stored0123"}


async def _store_config(
    redis_server: RedisServer, provider_key: str, secrets: dict[str, str], *, active: bool = True
) -> None:
    """A configuration stored, under KEY, by another worker or an earlier run."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await ProviderConfigStore(client, prefix="test:", box=SecretBox(KEY)).create(
            provider_key=provider_key,
            service_type="payment",
            config={},
            secrets_=secrets,
            capabilities=None,
            active=active,
        )
    finally:
        await client.aclose()


@asynccontextmanager
async def _running(settings: Settings, pool: ProcessPoolExecutor) -> AsyncIterator[Any]:
    application = create_app(settings, receipt_executor=pool)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def provider_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of ``payments.providers``: the app's logging stops ``payments`` propagating
    to the root, where caplog listens."""
    logger = logging.getLogger("payments.providers")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


UNSET = "PROVIDER_SECRETS_KEY is unset"
WRONG = "PROVIDER_SECRETS_KEY is wrong (none of its keys decrypts them)"


class TestUnreadableStoredConfigs:
    """Stored configurations whose secrets this process cannot decrypt are never ignored
    silently: production refuses to start, elsewhere health says degraded and why, and the
    provider they configure is held out rather than run on the environment's credentials."""

    @pytest.fixture(params=[None, OTHER_KEY], ids=["unset", "wrong"])
    def settings_overrides(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"provider_secrets_key": request.param, "rate_limits_enabled": False}

    @pytest.fixture
    def why(self, settings: Settings) -> str:
        return UNSET if settings.provider_secrets_key is None else WRONG

    async def test_production_refuses_to_start(
        self, settings: Settings, redis_server: RedisServer, render_pool: Any, why: str
    ) -> None:
        await _store_config(redis_server, "stripe", STRIPE_SECRETS)
        production = settings.model_copy(
            update={
                "environment": "production",
                "payment_provider": "stripe",
                "stripe_secret_key": SecretStr("sk_test_environment0123456789"),
                "stripe_webhook_secret": SecretStr("whsec_environment0123"),
            }
        )
        with pytest.raises(StoredConfigsUnreadable) as refused:
            async with _running(production, render_pool):
                pytest.fail("started")
        assert str(refused.value) == (
            f"refusing to start in production: stored provider configs cannot be decrypted: "
            f"{why}; 1 config ignored and its provider held out (stripe)"
        )
        # With the key that encrypted them, it starts.
        right_key = production.model_copy(update={"provider_secrets_key": SecretStr(KEY)})
        async with _running(right_key, render_pool):
            pass

    async def test_elsewhere_health_is_degraded_and_says_why(
        self, settings: Settings, redis_server: RedisServer, render_pool: Any, admin: Any, why: str
    ) -> None:
        await _store_config(redis_server, "stripe", STRIPE_SECRETS)
        await _store_config(redis_server, "paypal", {"client_secret": "paypal-secret-0123"})
        reason = (
            f"stored provider configs cannot be decrypted: {why}; "
            "2 configs ignored and their providers held out (paypal, stripe)"
        )
        async with _running(settings, render_pool) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                health = await client.get("/admin/health", headers=admin)
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded"
        assert body["stored_configs"] == {
            "status": "degraded",
            "problem": "secrets_key_missing" if why == UNSET else "secrets_undecryptable",
            "reason": reason,
            "held_out": ["paypal", "stripe"],
        }
        for name in ("stripe", "paypal"):
            assert body["providers"][name]["status"] == "error"
            assert body["providers"][name]["message"] == reason
        assert body["providers"]["sandbox"]["status"] == "connected"

    async def test_the_held_out_provider_does_not_run_on_the_environments_secrets(
        self, settings: Settings, redis_server: RedisServer, render_pool: Any
    ) -> None:
        await _store_config(redis_server, "sandbox", {"webhook_secret": NEW_SECRET})
        async with _running(settings, render_pool) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                refused = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
                webhook = await _signed_webhook(client, "sandbox-webhook-secret", "sb_0123456789ab")
        assert_problem(refused, 503, "provider_not_configured")
        # Refused as unavailable, so the sender delivers it again once the key is right.
        assert_problem(webhook, 503, "provider_not_configured")

    async def test_deactivations_and_routing_stored_beside_them_still_apply(
        self, settings: Settings, redis_server: RedisServer, render_pool: Any, admin: Any
    ) -> None:
        await _store_config(redis_server, "stripe", STRIPE_SECRETS)
        await _store_config(redis_server, "sandbox", {}, active=False)
        client_ = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await ProviderConfigStore(client_, prefix="test:", box=SecretBox(KEY)).set_routing(
                RoutingConfig(default="sandbox", fallback=["mobilepay"])
            )
        finally:
            await client_.aclose()
        async with _running(settings, render_pool) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                routing = await client.get("/api/v1/providers/routing", headers=admin)
                refused = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        assert routing.json()["fallback"] == ["mobilepay"]
        detail = assert_problem(refused, 503, "provider_not_configured")["detail"]
        assert "sandbox provider is deactivated" in detail

    async def test_logged_when_it_starts_and_when_it_clears_not_on_every_reload(
        self,
        settings: Settings,
        redis_server: RedisServer,
        render_pool: Any,
        admin: Any,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        def events() -> list[tuple[int, str]]:
            return [
                (record.levelno, record.getMessage())
                for record in provider_logs.records
                if "stored_configs" in record.getMessage()
            ]

        async with _running(settings, render_pool) as application:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

                async def health() -> str:
                    answer = await client.get("/admin/health", headers=admin)
                    status: str = answer.json()["stored_configs"]["status"]
                    return status

                assert await health() == "ok"
                await _store_config(redis_server, "stripe", STRIPE_SECRETS)

                async def degraded() -> bool:
                    return await health() == "degraded"

                await _eventually(degraded)
                # Other changes reload the providers; the condition is as it was: no new line.
                for weights in ({"sandbox": 1}, {"sandbox": 2}):
                    body = {"default": "sandbox", "weights": weights}
                    await client.put("/api/v1/providers/routing", headers=admin, json=body)
                await asyncio.sleep(0.6)
                assert events() == [(logging.ERROR, "providers.stored_configs_unreadable")]

                configs = (await client.get("/api/v1/providers/configs", headers=admin)).json()
                await client.delete(f"/api/v1/providers/configs/{configs[0]['id']}", headers=admin)

                async def ok() -> bool:
                    return await health() == "ok"

                await _eventually(ok)
        assert events() == [
            (logging.ERROR, "providers.stored_configs_unreadable"),
            (logging.WARNING, "providers.stored_configs_readable_again"),
        ]
