"""The provider platform: stored configurations with encrypted secrets, hot swap across
workers, run-time routing. Over the real app and Redis; two app instances stand in for two
worker processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from cryptography.fernet import Fernet

from app.main import create_app
from app.settings import Settings
from services.payment_providers.factory import PaymentProviderFactory
from services.payment_providers.placeholders import GooglePayProvider
from services.payment_providers.sandbox import sign_webhook
from services.provider_configs import SecretBox
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
        routing = await client.put(
            "/api/v1/providers/routing",
            headers=admin,
            json={"default": "mobilepay", "fallback": ["sandbox"]},
        )
        assert routing.json()["default"] == "mobilepay"
        created = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        record = await app.state.store.get(created.json()["payment_id"])
        assert [(a.provider, a.outcome) for a in record.attempts] == [
            ("mobilepay", "skipped"),
            ("sandbox", "succeeded"),
        ]
        health = await client.get("/admin/health", headers=admin)
        assert health.json()["status"] == "unhealthy"  # the default cannot take payments

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
    def test_split_is_sticky_and_proportional(self, settings: Settings) -> None:
        providers = [GooglePayProvider(), type("Other", (GooglePayProvider,), {"name": "other"})()]
        factory = PaymentProviderFactory.create(
            providers,
            settings=settings,
            default="googlepay",
            fallback=[],
            weights={"googlepay": 70, "other": 30},
        )
        picks = Counter(factory.route(None, customer=f"c{n}")[0].name for n in range(2000))
        assert 0.65 < picks["googlepay"] / 2000 < 0.75
        assert {factory.route(None, customer="alice")[0].name for _ in range(20)} == {
            factory.route(None, customer="alice")[0].name
        }


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
