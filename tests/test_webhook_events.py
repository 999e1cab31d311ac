"""Events for the merchant's backend, through the HTTP API, delivered over loopback to a real
receiver and checked with the Standard Webhooks library: endpoints (admin only, hostile input,
SSRF), signatures and secret rotation, retries until a receiver recovers, order per payment,
a worker that dies mid-delivery, a process that dies between a change and its relay."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.main import create_app
from app.settings import Settings
from services.events.service import GROUP, WebhookEvents
from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox
from tests.webhook_receiver import Receiver, running_receiver

URL = "/api/v1/webhook-endpoints"
SECRETS_KEY = Fernet.generate_key().decode()


def fast_events(**overrides: Any) -> dict[str, Any]:
    """Short retry schedule and leases, so a test sees days of retries in a second."""
    return {
        "provider_secrets_key": SECRETS_KEY,
        "rate_limits_enabled": False,
        "webhook_allow_private_urls": True,
        "webhook_retry_schedule": [0.1, 0.2, 0.3],
        "webhook_timeout_seconds": 1.0,
        "webhook_claim_idle_seconds": 1.5,
        "webhook_poll_interval_seconds": 0.05,
        "webhook_sweep_interval_seconds": 0.05,
        "webhook_sweep_grace_seconds": 0.3,
        "webhook_retention_seconds": 3600,
        **overrides,
    }


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return fast_events()


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def _deliveries_counted(outcome: str) -> float:
    """payments_webhook_deliveries_total{outcome} in this process's registry."""
    value = REGISTRY.get_sample_value("payments_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], within_s: float = 10.0
) -> None:
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {within_s} s")
        await asyncio.sleep(0.05)


async def add_endpoint(
    client: httpx.AsyncClient, admin: dict[str, str], url: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(URL, json={"url": url, **body}, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def paid(client: httpx.AsyncClient, outcome: str = "succeeded") -> str:
    payment = await create_payment(client)
    await pay_in_sandbox(client, payment["payment_id"], outcome)
    return str(payment["payment_id"])


def verified(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    """The bodies the receiver accepted, each checked with the Standard Webhooks library."""
    bodies = []
    for item in receiver.accepted():
        bodies.append(Webhook(secret).verify(item.body, item.headers))
    return bodies


@asynccontextmanager
async def another_app(
    settings: Settings, pool: ProcessPoolExecutor, **changes: Any
) -> AsyncIterator[Any]:
    """Another app process on the same Redis, as another worker would be."""
    other = create_app(settings.model_copy(update=changes), receipt_executor=pool)
    async with other.router.lifespan_context(other):
        yield other


class TestEndpointsApi:
    async def test_create_answers_the_secret_once_and_never_again(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(
            client, admin, receiver.url, event_types=["payment.succeeded"], description="shop"
        )
        assert created["id"].startswith("we_")
        assert created["secret"].startswith("whsec_")
        Webhook(created["secret"])  # the library reads it
        assert (created["enabled"], created["status"]) == (True, "active")
        shown = (await client.get(f"{URL}/{created['id']}", headers=admin)).json()
        listed = (await client.get(URL, headers=admin)).json()
        assert "secret" not in shown and [item["id"] for item in listed] == [created["id"]]
        assert created["secret"] not in json.dumps(listed)

    async def test_secret_is_stored_encrypted(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        settings: Settings,
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        raw = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            stored = await raw.hgetall(f"test:whep:{{{created['id']}}}")
        finally:
            await raw.aclose()
        secret_bytes = created["secret"].removeprefix("whsec_")
        assert stored and not any(secret_bytes in value for value in stored.values())

    async def test_update_and_delete(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        path = f"{URL}/{created['id']}"
        patched = await client.patch(
            path, json={"enabled": False, "event_types": ["refund.failed"]}, headers=admin
        )
        assert patched.status_code == 200, patched.text
        assert (patched.json()["enabled"], patched.json()["event_types"]) == (
            False,
            ["refund.failed"],
        )
        assert (await client.delete(path, headers=admin)).status_code == 204
        assert_problem(await client.get(path, headers=admin), 404, "webhook_endpoint_not_found")
        assert_problem(await client.delete(path, headers=admin), 404, "webhook_endpoint_not_found")

    async def test_admins_only(
        self, client: httpx.AsyncClient, token: Any, receiver: Receiver
    ) -> None:
        assert_problem(await client.get(URL), 401, "not_authenticated")
        user = bearer(token("alice"))
        assert_problem(await client.get(URL, headers=user), 403, "forbidden")
        response = await client.post(URL, json={"url": receiver.url}, headers=user)
        assert response.status_code == 403
        response = await client.post(f"{URL}/we_0123456789abcdef/rotate-secret", headers=user)
        assert response.status_code == 403

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"url": 5},
            {"url": "ftp://example.com/x"},
            {"url": "http://user:pw@example.com/x"},
            {"url": "http://example.com/" + "a" * 3000},
            {"url": "http://exa mple.com/"},
            {"url": "http:///nohost"},
            {"url": "http://example.com:99999/"},
            {"url": "RECEIVER", "event_types": ["payment.exploded"]},
            {"url": "RECEIVER", "event_types": "payment.succeeded"},
            {"url": "RECEIVER", "description": "x" * 501},
            {"url": "RECEIVER", "secret": "whsec_mine"},
            {"url": "RECEIVER", "enabled": "maybe"},
        ],
    )
    async def test_hostile_input_is_a_clear_422(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        body: dict[str, Any],
    ) -> None:
        if body.get("url") == "RECEIVER":
            body = {**body, "url": receiver.url}
        response = await client.post(URL, json=body, headers=admin)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] in ("validation_error", "webhook_url_refused")

    async def test_odd_ids_and_bodies_are_4xx(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        for path in (f"{URL}/nope", f"{URL}/we_0123456789abcdef/deliveries/../../x"):
            assert (await client.get(path, headers=admin)).status_code in (404, 422)
        missing = f"{URL}/we_0123456789abcdef"
        assert_problem(
            await client.get(f"{missing}/deliveries", headers=admin),
            404,
            "webhook_endpoint_not_found",
        )
        response = await client.post(
            URL, content=b"{not json", headers={**admin, "content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500
        deep = "[" * 5000 + "]" * 5000
        response = await client.post(
            URL, content=deep.encode(), headers={**admin, "content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500


class TestPrivateAddressesAreRefused:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return fast_events(webhook_allow_private_urls=False)

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8000/hooks",
            "http://localhost/hooks",
            "http://10.1.2.3/hooks",
            "http://192.168.0.10/hooks",
            "http://172.16.5.4/hooks",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/hooks",
            "http://[::ffff:127.0.0.1]/hooks",
            "http://[fe80::1]/hooks",
            "http://0.0.0.0/hooks",
            "http://100.64.0.1/hooks",
        ],
    )
    async def test_at_creation(
        self, client: httpx.AsyncClient, admin: dict[str, str], url: str
    ) -> None:
        assert_problem(
            await client.post(URL, json={"url": url}, headers=admin), 422, "webhook_url_refused"
        )

    async def test_and_on_update(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        # An endpoint saved while private addresses were allowed (a name that resolved to a
        # public address then, say) is refused on a change to a private one.
        async with another_app(
            settings, render_pool, webhook_allow_private_urls=True, webhook_worker_enabled=False
        ) as other:
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as allowed:
                created = await add_endpoint(allowed, admin, "http://127.0.0.1:9/hooks")
        response = await client.patch(
            f"{URL}/{created['id']}", json={"url": "http://10.0.0.1/"}, headers=admin
        )
        assert_problem(response, 422, "webhook_url_refused")

    async def test_again_at_delivery(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        settings: Settings,
        render_pool: ProcessPoolExecutor,
        receiver: Receiver,
    ) -> None:
        """A name that pointed elsewhere when saved and at us now (DNS rebinding) gets no
        request: the address is checked again at each attempt, and the connection goes to
        the address checked. Here: saved by an app that allowed loopback, delivered by this
        one, which does not."""
        async with another_app(
            settings, render_pool, webhook_allow_private_urls=True, webhook_worker_enabled=False
        ) as other:
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as allowed:
                created = await add_endpoint(allowed, admin, receiver.url)
        await paid(client)
        log_url = f"{URL}/{created['id']}/deliveries"

        async def attempted() -> bool:
            log = (await client.get(log_url, headers=admin)).json()
            return bool(log) and log[0]["attempts"] >= 1

        await eventually(attempted)
        entry = (await client.get(log_url, headers=admin)).json()[0]
        assert entry["last_error"].startswith("url_refused")
        assert receiver.all() == []


class TestDelivery:
    async def test_a_paid_payment_is_delivered_signed_with_the_object_after_the_change(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url, event_types=["payment.succeeded"])
        payment_id = await paid(client)
        await eventually(lambda: len(receiver.accepted()) == 1)
        (body,) = verified(receiver, created["secret"])
        assert set(body) == {"type", "timestamp", "data"}
        assert body["type"] == "payment.succeeded"
        assert (body["data"]["payment_id"], body["data"]["status"]) == (payment_id, "succeeded")
        assert body["data"]["amount"] == 2900 and body["data"]["currency"] == "EUR"
        headers = receiver.accepted()[0].headers
        assert headers["webhook-id"].startswith("evt_")
        assert headers["webhook-signature"].startswith("v1,")
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        # Another secret does not verify it.
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "QUJD" * 8).verify(receiver.accepted()[0].body, headers)

        log = (await client.get(f"{URL}/{created['id']}/deliveries", headers=admin)).json()
        assert [(d["status"], d["attempts"], d["last_status_code"]) for d in log] == [
            ("succeeded", 1, 204)
        ]
        assert log[0]["last_latency_ms"] >= 0 and log[0]["event_type"] == "payment.succeeded"
        assert log[0]["object_id"] == payment_id

    async def test_only_subscribed_types_and_enabled_endpoints(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        await add_endpoint(client, admin, receiver.url, event_types=["payment.failed"])
        await add_endpoint(client, admin, receiver.url, enabled=False)
        await paid(client, "succeeded")
        await paid(client, "failed")
        await eventually(lambda: len(receiver.accepted()) == 1)
        await asyncio.sleep(0.3)
        assert [json.loads(r.body)["type"] for r in receiver.accepted()] == ["payment.failed"]

    async def test_refund_events_follow_the_payment_in_order(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        payment_id = await paid(client)
        response = await client.post(
            f"/api/v1/payment/{payment_id}/refund", json={"amount": 900}, headers=admin
        )
        assert response.status_code in (200, 202), response.text
        response = await client.post(f"/api/v1/payment/{payment_id}/refund", json={}, headers=admin)
        assert response.status_code in (200, 202), response.text
        await eventually(lambda: len(receiver.accepted()) >= 5)
        types = [body["type"] for body in verified(receiver, created["secret"])]
        assert types == [
            "payment.succeeded",
            "refund.succeeded",
            "payment.partially_refunded",
            "refund.succeeded",
            "payment.refunded",
        ]
        refund = verified(receiver, created["secret"])[1]["data"]
        assert (refund["amount"], refund["status"], refund["payment_id"]) == (
            900,
            "succeeded",
            payment_id,
        )

    async def test_a_receiver_that_fails_and_recovers_gets_every_event_once_in_order(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        counted = {outcome: _deliveries_counted(outcome) for outcome in ("succeeded", "retry")}
        receiver.fail_next = 4
        payments = []
        for _ in range(3):
            payment_id = await paid(client)
            await client.post(f"/api/v1/payment/{payment_id}/refund", json={}, headers=admin)
            payments.append(payment_id)
        # Each payment: succeeded, refund.succeeded, refunded.
        await eventually(lambda: len(receiver.accepted()) == 9, within_s=15)
        await asyncio.sleep(0.5)
        accepted = receiver.accepted()
        assert len(accepted) == 9
        assert len({item.headers["webhook-id"] for item in accepted}) == 9
        assert len(receiver.all()) == 13  # the four failures were retried
        bodies = verified(receiver, created["secret"])
        for payment_id in payments:
            mine = [b["type"] for b in bodies if b["data"]["payment_id"] == payment_id]
            assert mine == ["payment.succeeded", "refund.succeeded", "payment.refunded"]
        # And payments_webhook_deliveries_total counted them: 9 delivered, 4 to retry.
        assert _deliveries_counted("succeeded") - counted["succeeded"] == 9
        assert _deliveries_counted("retry") - counted["retry"] == 4

    async def test_a_receiver_down_for_the_whole_schedule_marks_the_endpoint_failing(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        path = f"{URL}/{created['id']}"
        receiver.down = True
        await paid(client)

        async def given_up() -> bool:
            log = (await client.get(f"{path}/deliveries", headers=admin)).json()
            return bool(log) and log[0]["status"] == "failed"

        await eventually(given_up)
        log = (await client.get(f"{path}/deliveries", headers=admin)).json()
        assert log[0]["attempts"] == 4  # the first try and the schedule's three retries
        assert log[0]["last_status_code"] == 503
        assert 0 < len(log[0]["last_response"]) <= 512  # an excerpt of the 5000 bytes
        endpoint = (await client.get(path, headers=admin)).json()
        assert endpoint["status"] == "failing" and endpoint["failing_since"]
        # While it is failing, a new event gets one attempt, not days of them.
        await paid(client)

        async def second_given_up() -> bool:
            log = (await client.get(f"{path}/deliveries", headers=admin)).json()
            return len(log) == 2 and log[0]["status"] == "failed"

        await eventually(second_given_up)
        newest = (await client.get(f"{path}/deliveries", headers=admin)).json()[0]
        assert newest["attempts"] == 1

        receiver.down = False
        replay = await client.post(f"{path}/deliveries/{log[0]['id']}/replay", headers=admin)
        assert replay.status_code == 202, replay.text
        assert replay.json()["replay_of"] == log[0]["id"]
        await eventually(lambda: len(receiver.accepted()) == 1)
        await eventually(lambda: _status(client, path, admin, "active"))
        assert len(verified(receiver, created["secret"])) == 1

    async def test_replay_of_an_event_to_an_endpoint_made_after_it(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        first = await add_endpoint(client, admin, receiver.url)
        await paid(client)
        await eventually(lambda: len(receiver.accepted()) == 1)
        event_id = receiver.accepted()[0].headers["webhook-id"]
        later = await add_endpoint(client, admin, receiver.url)
        response = await client.post(f"{URL}/{later['id']}/events/{event_id}/replay", headers=admin)
        assert response.status_code == 202, response.text
        await eventually(lambda: len(receiver.accepted()) == 2)
        assert receiver.accepted()[1].headers["webhook-id"] == event_id
        Webhook(later["secret"]).verify(receiver.accepted()[1].body, receiver.accepted()[1].headers)
        missing = f"{URL}/{first['id']}/events/evt_{'0' * 24}/replay"
        assert_problem(await client.post(missing, headers=admin), 404, "webhook_event_not_found")

    async def test_redirects_are_not_followed(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        with running_receiver() as elsewhere:
            receiver.redirect_to = elsewhere.url
            created = await add_endpoint(client, admin, receiver.url)
            await paid(client)
            log_url = f"{URL}/{created['id']}/deliveries"

            async def attempted() -> bool:
                log = (await client.get(log_url, headers=admin)).json()
                return bool(log) and log[0]["attempts"] >= 1

            await eventually(attempted)
            assert (await client.get(log_url, headers=admin)).json()[0]["last_status_code"] == 307
            assert elsewhere.all() == []


async def _status(client: httpx.AsyncClient, path: str, admin: dict[str, str], status: str) -> bool:
    return bool((await client.get(path, headers=admin)).json()["status"] == status)


class TestSecretRotation:
    async def test_both_secrets_sign_during_the_overlap_then_only_the_new_one(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        path = f"{URL}/{created['id']}/rotate-secret"
        rotated = await client.post(path, json={"overlap_seconds": 3600}, headers=admin)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["secret"]
        assert new.startswith("whsec_") and new != created["secret"]
        await paid(client)
        await eventually(lambda: len(receiver.accepted()) == 1)
        delivered = receiver.accepted()[0]
        assert len(delivered.headers["webhook-signature"].split(" ")) == 2
        Webhook(new).verify(delivered.body, delivered.headers)
        Webhook(created["secret"]).verify(delivered.body, delivered.headers)

        newest = (await client.post(path, json={"overlap_seconds": 0}, headers=admin)).json()
        assert newest["previous_expires_at"] is None
        await paid(client)
        await eventually(lambda: len(receiver.accepted()) == 2)
        second = receiver.accepted()[1]
        assert len(second.headers["webhook-signature"].split(" ")) == 1
        Webhook(newest["secret"]).verify(second.body, second.headers)
        for old in (new, created["secret"]):
            with pytest.raises(WebhookVerificationError):
                Webhook(old).verify(second.body, second.headers)

    async def test_overlap_is_bounded(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        path = f"{URL}/{created['id']}/rotate-secret"
        for overlap in (-1, 8 * 86400, "soon"):
            response = await client.post(path, json={"overlap_seconds": overlap}, headers=admin)
            assert_problem(response, 422, "validation_error")


class TestNothingIsLost:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return fast_events(webhook_worker_enabled=False)

    async def test_a_worker_killed_mid_delivery_leaves_it_to_another(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        """The first app runs no worker: a 'dead' consumer takes the delivery from the group
        and begins it (as a worker killed mid-request would have), and never acknowledges
        it. A second app's worker takes it over once it has been idle for the lease."""
        created = await add_endpoint(client, admin, receiver.url)
        await paid(client)
        events: WebhookEvents = app.state.webhook_events
        await eventually(lambda: _log_size(client, created["id"], admin, 1))
        await events.ensure_group()
        assert await events.schedule_once() == 1
        raw = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            stream = "test:wh:{stream}"
            taken = await raw.xreadgroup(GROUP, "dead-worker", {stream: ">"}, count=10)
            ((_, [(_, fields)]),) = taken
            begun = await events.deliveries.begin(
                fields["endpoint"], fields["delivery"], lease_s=1.5
            )
            assert begun.outcome == "go"
            async with another_app(settings, render_pool, webhook_worker_enabled=True):
                await eventually(lambda: len(receiver.accepted()) == 1, within_s=10)
                await eventually(lambda: _no_pending(raw, stream), within_s=5)
            Webhook(created["secret"]).verify(
                receiver.accepted()[0].body, receiver.accepted()[0].headers
            )
        finally:
            await raw.aclose()

    async def test_an_endpoint_whose_secret_cannot_be_read_holds_up_no_other(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        """A signing secret stored under a key no longer deployed: that endpoint's deliveries
        fail (never sent unsigned) and are retried; every other endpoint's arrive at once."""
        broken = await add_endpoint(client, admin, receiver.url + "?broken")
        good = await add_endpoint(client, admin, receiver.url)
        raw = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            other_key = Fernet(Fernet.generate_key())
            unreadable = other_key.encrypt(b'{"current": "whsec_x"}').decode()
            await raw.hset(f"test:whep:{{{broken['id']}}}", "secrets", unreadable)
        finally:
            await raw.aclose()
        payment_ids = [await paid(client) for _ in range(3)]
        async with another_app(settings, render_pool, webhook_worker_enabled=True):
            await eventually(lambda: len(receiver.accepted()) == 3)
            await eventually(lambda: _log_size(client, broken["id"], admin, 3), within_s=5)
            log = (await client.get(f"{URL}/{broken['id']}/deliveries", headers=admin)).json()
        assert all(d["status"] != "succeeded" for d in log)
        assert {d["last_error"] for d in log if d["attempts"]} <= {"secrets_undecryptable"}
        assert any(d["attempts"] for d in log)
        bodies = verified(receiver, good["secret"])
        assert sorted(b["data"]["payment_id"] for b in bodies) == sorted(payment_ids)
        assert len(receiver.all()) == 3  # nothing reached it from the broken endpoint

    async def test_a_process_that_dies_between_the_change_and_the_relay_loses_nothing(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        # This process "dies" right after its change scripts: it never relays.
        app.state.store.outbox_listener = None
        payment_id = await paid(client)
        await asyncio.sleep(0.1)
        assert await _log_size(client, created["id"], admin, 0)
        async with another_app(settings, render_pool, webhook_worker_enabled=True):
            await eventually(lambda: len(receiver.accepted()) == 1)
        (body,) = verified(receiver, created["secret"])
        assert (body["type"], body["data"]["payment_id"]) == ("payment.succeeded", payment_id)


SWEEP_LEASE_KEY = "test:wh:{sweep}:leader"
SWEEP_LEASE_S = 1.0  # fast_events sweeps every 0.05 s: the lease's floor, a second


class TestSweepLeadership:
    """The sweep (outboxes a dead process left) is one worker's job at a time: the holder of
    a lease in Redis. Another takes over when it stops, or when a dead one's lease lapses."""

    async def test_one_worker_sweeps_and_another_takes_over_when_it_stops(
        self, app: Any, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        first: WebhookEvents = app.state.webhook_events
        async with another_app(settings, render_pool) as other:
            second: WebhookEvents = other.state.webhook_events
            await eventually(lambda: first.sweeps + second.sweeps >= 3)
            assert [first.sweep_leader, second.sweep_leader].count(True) == 1
            leader, follower = (first, second) if first.sweep_leader else (second, first)
            swept = leader.sweeps
            await asyncio.sleep(0.5)  # ten sweep intervals
            assert leader.sweeps > swept and follower.sweeps == 0
            await leader.aclose()  # lets go of the lease: the other sweeps at its next look
            await eventually(lambda: follower.sweeps > 0, within_s=SWEEP_LEASE_S / 2)
            assert follower.sweep_leader

    async def test_a_dead_leaders_lease_lapses_and_another_takes_over(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        raw = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            await dead_leader_is_replaced(client, admin, receiver, app, settings, render_pool, raw)
        finally:
            await raw.aclose()


async def dead_leader_is_replaced(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    receiver: Receiver,
    app: Any,
    settings: Settings,
    render_pool: ProcessPoolExecutor,
    raw: Any,
) -> None:
    """An outbox left by a process that died, and a sweep leader that died holding the lease:
    nothing is swept while the lease runs, then another worker takes it and sweeps."""
    created = await add_endpoint(client, admin, receiver.url)
    await app.state.webhook_events.aclose()  # this process relays, sweeps and delivers nothing
    app.state.store.outbox_listener = None
    payment_id = await paid(client)
    await raw.set(SWEEP_LEASE_KEY, "dead-worker", px=int(SWEEP_LEASE_S * 1000))
    died = time.monotonic()
    async with another_app(settings, render_pool) as other:
        events: WebhookEvents = other.state.webhook_events
        await asyncio.sleep(SWEEP_LEASE_S / 2)
        assert (receiver.all(), events.sweeps) == ([], 0)  # the dead one still holds it
        await eventually(lambda: len(receiver.accepted()) == 1, within_s=SWEEP_LEASE_S + 5)
        assert time.monotonic() - died >= SWEEP_LEASE_S * 0.9
        assert events.sweep_leader and await raw.get(SWEEP_LEASE_KEY) not in (None, "dead-worker")
    (body,) = verified(receiver, created["secret"])
    assert (body["type"], body["data"]["payment_id"]) == ("payment.succeeded", payment_id)


async def _log_size(
    client: httpx.AsyncClient, endpoint_id: str, admin: dict[str, str], size: int
) -> bool:
    log = (await client.get(f"{URL}/{endpoint_id}/deliveries", headers=admin)).json()
    return len(log) == size


async def _no_pending(raw: Any, stream: str) -> bool:
    summary = await raw.xpending(stream, GROUP)
    return int(summary["pending"]) == 0
