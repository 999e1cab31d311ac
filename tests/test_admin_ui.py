"""The admin dashboard over the real app and Redis, without a browser: who may see it, CSRF,
session expiry, search (hostile input included), routing, stored configs and refunds through
its forms. The browser's view is tests/e2e/test_admin_dashboard.py."""

from __future__ import annotations

import asyncio
import html
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from jose import jwt

from app.settings import Settings
from tests.conftest import (
    JWT_SECRET,
    RedisClusterNodes,
    RedisServer,
    bearer,
    create_payment,
    make_settings,
    pay_in_sandbox,
)

KEY = Fernet.generate_key().decode()
STORED_SECRET = "stored-sandbox-webhook-secret-0123456789"
_HIDDEN = re.compile(r'name="(csrf_token|idempotency_key)" value="([^"]*)"')


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"provider_secrets_key": KEY, "rate_limits_enabled": False}


def hidden(page: httpx.Response, name: str = "csrf_token") -> str:
    values = [value for field, value in _HIDDEN.findall(page.text) if field == name]
    assert values, f"no {name} in the page"
    return values[0]


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    form = await client.get("/admin/login")
    assert form.status_code == 200
    return await client.post("/admin/login", data={"token": token, "csrf_token": hidden(form)})


@pytest.fixture
async def admin_client(client: httpx.AsyncClient, token: Any) -> httpx.AsyncClient:
    signed = await sign_in(client, token("ops", admin=True))
    assert signed.status_code == 303 and signed.headers["location"] == "/admin", signed.text
    return client


async def csrf(client: httpx.AsyncClient, path: str = "/admin") -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    return hidden(page)


def assert_secure_page(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"


class TestSignIn:
    async def test_an_admin_token_becomes_a_strict_httponly_session_cookie(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        signed = await sign_in(client, token("ops", admin=True))
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"]
        assert cookie.startswith("payments_admin_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
        assert "Secure" not in cookie  # plain http here; https sets it (see the next test)
        page = await client.get("/admin")
        assert page.status_code == 200
        assert 'id="provider-sandbox"' in page.text
        assert 'id="signed-in-as">ops<' in page.text

    async def test_over_https_the_cookie_is_secure(self, app: Any, token: Any) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://admin.test") as http:
            signed = await sign_in(http, token("ops", admin=True))
        assert signed.status_code == 303
        assert "Secure" in signed.headers["set-cookie"]

    async def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
        self, admin_client: httpx.AsyncClient
    ) -> None:
        stolen = admin_client.cookies["payments_admin_session"]
        out = await admin_client.post(
            "/admin/logout", data={"csrf_token": await csrf(admin_client)}
        )
        assert out.status_code == 303 and out.headers["location"] == "/admin/login"
        admin_client.cookies.set("payments_admin_session", stolen, path="/admin")
        again = await admin_client.get("/admin/payments")
        assert again.status_code == 303 and again.headers["location"] == "/admin/login"

    async def test_the_token_is_not_kept_in_redis_nor_the_session_id(
        self, admin_client: httpx.AsyncClient, redis_server: RedisServer, settings: Settings
    ) -> None:
        session_id = admin_client.cookies["payments_admin_session"]
        keys = await _keys(settings, "admin-session:*")
        assert len(keys) == 1 and session_id not in keys[0]


class TestNoPageForAnyoneElse:
    @pytest.mark.parametrize(
        "path",
        [
            "/admin",
            "/admin/routing",
            "/admin/configs",
            "/admin/payments?user=alice",
            "/admin/payments/sb_0123456789",
            "/admin/reconciliation",
            "/admin/webhooks",
        ],
    )
    async def test_without_a_session_every_page_is_the_sign_in_page(
        self, client: httpx.AsyncClient, token: Any, path: str
    ) -> None:
        # An admin's bearer header is not a session: pages are read with the cookie only.
        response = await client.get(
            path, headers={"Authorization": f"Bearer {token('ops', admin=True)}"}
        )
        assert response.status_code == 303 and response.headers["location"] == "/admin/login"
        assert response.text == ""
        assert_secure_page(response)

    async def test_a_user_token_is_refused_at_sign_in(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        refused = await sign_in(client, token("alice"))
        assert refused.status_code == 403
        assert "not an administrator" in refused.text
        assert "payments_admin_session" not in client.cookies
        assert (await client.get("/admin")).status_code == 303

    @pytest.mark.parametrize(
        "bad",
        ["", "not-a-token", "a.b.c", "x" * 9000, "Bearer " + "e" * 50],
        ids=["empty", "garbage", "three-parts", "huge", "bearer-garbage"],
    )
    async def test_a_bad_token_is_refused_at_sign_in(
        self, client: httpx.AsyncClient, bad: str
    ) -> None:
        refused = await sign_in(client, bad)
        assert refused.status_code in (400, 401), refused.text
        assert "payments_admin_session" not in client.cookies

    async def test_a_forged_session_cookie_is_no_session(self, client: httpx.AsyncClient) -> None:
        client.cookies.set("payments_admin_session", "forged-" + "a" * 40, path="/admin")
        response = await client.get("/admin/payments")
        assert response.status_code == 303

    async def test_a_post_without_a_session_changes_nothing(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        response = await client.post("/admin/routing", data={"default": "stripe", "force": "true"})
        assert response.status_code == 401
        assert 'id="sign-in"' in response.text
        assert app.state.provider_admin.routing().default == "sandbox"


class TestCsrf:
    async def test_a_form_without_the_token_is_refused(
        self, admin_client: httpx.AsyncClient, app: Any
    ) -> None:
        response = await admin_client.post(
            "/admin/routing", data={"default": "stripe", "force": "true"}
        )
        assert response.status_code == 403
        assert_secure_page(response)
        assert app.state.provider_admin.routing().default == "sandbox"

    async def test_another_sessions_token_is_refused(
        self, admin_client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
            await sign_in(other, token("other-admin", admin=True))
            theirs = await csrf(other)
        response = await admin_client.post(
            "/admin/routing", data={"default": "stripe", "force": "true", "csrf_token": theirs}
        )
        assert response.status_code == 403
        assert app.state.provider_admin.routing().default == "sandbox"

    @pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://testserver.evil"])
    async def test_a_form_from_another_origin_is_refused(
        self, admin_client: httpx.AsyncClient, app: Any, origin: str
    ) -> None:
        response = await admin_client.post(
            "/admin/routing",
            data={"default": "stripe", "force": "true", "csrf_token": await csrf(admin_client)},
            headers={"Origin": origin},
        )
        assert response.status_code == 403
        assert app.state.provider_admin.routing().default == "sandbox"

    async def test_sign_in_needs_the_sign_in_forms_own_token(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        # A page elsewhere posting a token of its own (login CSRF) has no login cookie.
        response = await client.post(
            "/admin/login", data={"token": token("ops", admin=True), "csrf_token": "guess"}
        )
        assert response.status_code == 403
        assert "payments_admin_session" not in client.cookies

    async def test_sign_out_needs_the_token_too(self, admin_client: httpx.AsyncClient) -> None:
        assert (await admin_client.post("/admin/logout", data={})).status_code == 403
        assert (await admin_client.get("/admin")).status_code == 200


class TestSessionExpiry:
    async def test_a_session_ends_with_its_token(
        self, client: httpx.AsyncClient, settings: Settings
    ) -> None:
        now = int(time.time())
        short = jwt.encode(
            {"sub": "ops", "role": "admin", "iat": now, "exp": now + 2}, JWT_SECRET, "HS256"
        )
        assert (await sign_in(client, short)).status_code == 303
        assert (await client.get("/admin")).status_code == 200
        [key] = await _keys(settings, "admin-session:*")
        assert 0 < await _pttl(settings, key) <= 2000
        await asyncio.sleep(2.1)
        expired = await client.get("/admin")
        assert expired.status_code == 303 and expired.headers["location"] == "/admin/login"

    async def test_a_session_lasts_at_most_the_configured_time(
        self, client: httpx.AsyncClient, settings: Settings, token: Any
    ) -> None:
        assert (await sign_in(client, token("ops", admin=True, minutes=240))).status_code == 303
        [key] = await _keys(settings, "admin-session:*")
        ttl_ms = await _pttl(settings, key)
        assert settings.admin_session_ttl_seconds * 1000 - 5000 < ttl_ms
        assert ttl_ms <= settings.admin_session_ttl_seconds * 1000


class TestSecurityHeaders:
    @pytest.mark.parametrize(
        "path", ["/admin", "/admin/payments?status=bogus", "/admin/payments/sb_missing000"]
    )
    async def test_every_page_has_them(self, admin_client: httpx.AsyncClient, path: str) -> None:
        assert_secure_page(await admin_client.get(path))

    async def test_the_sign_in_page_and_stylesheet_have_them(
        self, client: httpx.AsyncClient
    ) -> None:
        login = await client.get("/admin/login")
        assert_secure_page(login)
        assert "<script" not in login.text
        css = await client.get("/admin/static/admin.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")

    async def test_pages_are_not_in_the_api_document(self, client: httpx.AsyncClient) -> None:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert not [
            path for path in paths if path.startswith("/admin/") and path != "/admin/health"
        ]


class TestSearch:
    @pytest.fixture
    async def payments(self, client: httpx.AsyncClient, token: Any) -> dict[str, list[str]]:
        made: dict[str, list[str]] = {"alice": [], "bob": [], "alice-paid": []}
        for _ in range(3):
            made["alice"].append((await create_payment(client, token=token("alice")))["payment_id"])
        for _ in range(2):
            made["bob"].append((await create_payment(client, token=token("bob")))["payment_id"])
        paid = made["alice"][0]
        assert (await pay_in_sandbox(client, paid)).status_code == 200
        made["alice-paid"].append(paid)
        return made

    async def _found(self, client: httpx.AsyncClient, **query: str) -> list[str]:
        page = await client.get("/admin/payments", params=query)
        assert page.status_code == 200, page.text
        return re.findall(r'<a href="/admin/payments/([^"]+)">', page.text)

    async def test_by_user_newest_first(
        self, admin_client: httpx.AsyncClient, payments: dict[str, list[str]]
    ) -> None:
        assert await self._found(admin_client, user="alice") == payments["alice"][::-1]
        assert await self._found(admin_client, user="bob") == payments["bob"][::-1]
        assert await self._found(admin_client, user="nobody") == []

    async def test_by_status_provider_and_id(
        self, admin_client: httpx.AsyncClient, payments: dict[str, list[str]]
    ) -> None:
        assert await self._found(admin_client, status="succeeded") == payments["alice-paid"]
        assert await self._found(admin_client, user="bob", status="succeeded") == []
        everyone = payments["alice"] + payments["bob"]
        assert sorted(await self._found(admin_client, provider="sandbox")) == sorted(everyone)
        assert await self._found(admin_client, provider="stripe") == []
        assert await self._found(admin_client, payment_id=payments["bob"][0]) == [
            payments["bob"][0]
        ]

    async def test_pages_follow_each_other_without_gaps(
        self, admin_client: httpx.AsyncClient, token: Any, client: httpx.AsyncClient
    ) -> None:
        made = [
            (await create_payment(client, token=token("carol")))["payment_id"] for _ in range(30)
        ]
        first = await admin_client.get("/admin/payments", params={"user": "carol"})
        shown = re.findall(r'<a href="/admin/payments/([^"]+)">', first.text)
        assert len(shown) == 25
        more = re.search(r'id="more" href="([^"]+)"', first.text)
        assert more is not None
        second = await admin_client.get(html.unescape(more[1]))
        shown += re.findall(r'<a href="/admin/payments/([^"]+)">', second.text)
        assert shown == made[::-1]
        assert 'id="more"' not in second.text

    @pytest.mark.parametrize(
        "query",
        [
            {"status": "bogus"},
            {"status": "succeeded' OR 1=1"},
            {"payment_id": "../../etc/passwd"},
            {"provider": "Stripe{x}"},
            {"cursor": "not-a-cursor"},
            {"cursor": "1e309:sb_x"},
            {"user": "u" * 300},
            {"unknown": "x", "status": "nope"},
        ],
    )
    async def test_hostile_queries_are_a_400_page(
        self, admin_client: httpx.AsyncClient, query: dict[str, str]
    ) -> None:
        page = await admin_client.get("/admin/payments", params=query)
        assert page.status_code == 400, page.text
        assert 'id="problem"' in page.text
        assert_secure_page(page)

    @pytest.mark.parametrize(
        "user",
        ["<script>alert(1)</script>", "{owner}", "a}b{c", "x\u202ey", "*", "\\x00"],
    )
    async def test_hostile_users_are_searched_for_and_escaped(
        self, admin_client: httpx.AsyncClient, user: str, token: Any, client: httpx.AsyncClient
    ) -> None:
        made = await create_payment(client, token=token(user))
        page = await admin_client.get("/admin/payments", params={"user": user})
        assert page.status_code == 200
        assert made["payment_id"] in page.text
        assert "<script>alert" not in page.text


class TestRoutingForm:
    async def test_routing_to_an_unconfigured_provider_is_refused_with_the_reason(
        self, admin_client: httpx.AsyncClient, app: Any
    ) -> None:
        token = await csrf(admin_client, "/admin/routing")
        refused = await admin_client.post(
            "/admin/routing", data={"default": "stripe", "csrf_token": token}
        )
        assert refused.status_code == 422
        assert "cannot take payments" in refused.text
        assert app.state.provider_admin.routing().default == "sandbox"

    async def test_a_forced_split_is_stored_as_the_api_would(
        self, admin_client: httpx.AsyncClient, client: httpx.AsyncClient, token: Any
    ) -> None:
        form = {
            "default": "sandbox",
            "fallback": "sandbox",
            "weights": "sandbox=90\nstripe=10",
            "force": "true",
            "csrf_token": await csrf(admin_client, "/admin/routing"),
        }
        saved = await admin_client.post("/admin/routing", data=form)
        assert saved.status_code == 303
        api = await client.get(
            "/api/v1/providers/routing",
            headers={"Authorization": f"Bearer {token('ops', admin=True)}"},
        )
        assert api.json() == {
            "default": "sandbox",
            "fallback": ["sandbox"],
            "weights": {"sandbox": 90, "stripe": 10},
        }

    @pytest.mark.parametrize(
        "weights", ["stripe", "stripe=-1", "STRIPE=1", "a=b", "<b>=1"], ids=str
    )
    async def test_bad_weights_are_a_400(
        self, admin_client: httpx.AsyncClient, weights: str
    ) -> None:
        form = {"default": "sandbox", "weights": weights, "csrf_token": await csrf(admin_client)}
        response = await admin_client.post("/admin/routing", data=form)
        assert response.status_code == 400, response.text
        assert "<b>=1" not in response.text


class TestStoredConfigs:
    async def test_create_edit_deactivate_with_secrets_never_shown(
        self, admin_client: httpx.AsyncClient
    ) -> None:
        token = await csrf(admin_client, "/admin/configs/new?provider=sandbox")
        created = await admin_client.post(
            "/admin/configs",
            data={
                "provider": "sandbox",
                "secret:webhook_secret": STORED_SECRET,
                "config:behaviour": '{"fail": "decline"}',
                "active": "true",
                "csrf_token": token,
            },
        )
        assert created.status_code == 303, created.text
        location = created.headers["location"]
        config_id = re.search(r"/admin/configs/(pc_[0-9a-f]{16})", location)
        assert config_id is not None
        for path in (location, "/admin/configs"):
            page = await admin_client.get(path)
            assert page.status_code == 200
            assert STORED_SECRET not in page.text
            assert "********" in page.text
        edit = await admin_client.get(f"/admin/configs/{config_id[1]}")
        assert "&#34;decline&#34;" in edit.text  # the stored setting, to edit
        # An edit that leaves the secret empty keeps it.
        changed = await admin_client.post(
            f"/admin/configs/{config_id[1]}",
            data={"config:behaviour": "", "csrf_token": hidden(edit)},
        )
        assert changed.status_code == 303, changed.text
        off = await admin_client.post(
            f"/admin/configs/{config_id[1]}/active", data={"csrf_token": hidden(edit)}
        )
        assert off.status_code == 303
        page = await admin_client.get(f"/admin/configs/{config_id[1]}")
        assert 'id="config-active">inactive<' in page.text
        assert "&#34;decline&#34;" not in page.text

    async def test_an_invalid_config_is_a_form_error_naming_the_field(
        self, admin_client: httpx.AsyncClient
    ) -> None:
        token = await csrf(admin_client, "/admin/configs/new?provider=sandbox")
        refused = await admin_client.post(
            "/admin/configs",
            data={"provider": "sandbox", "secret:webhook_secret": "short", "csrf_token": token},
        )
        assert refused.status_code == 422
        assert "config_secret.webhook_secret" in refused.text
        assert "short" not in re.sub(
            r"<[^>]+>|short-", "", refused.text.split('id="problem"')[1][:300]
        )


class TestRefundForm:
    async def test_a_refund_form_sent_twice_refunds_once(
        self, admin_client: httpx.AsyncClient, client: httpx.AsyncClient, token: Any
    ) -> None:
        paid = (await create_payment(client, token=token("alice")))["payment_id"]
        await pay_in_sandbox(client, paid)
        page = await admin_client.get(f"/admin/payments/{paid}")
        form = {
            "csrf_token": hidden(page),
            "idempotency_key": hidden(page, "idempotency_key"),
            "amount": "500",
            "reason": "goodwill",
        }
        first = await admin_client.post(f"/admin/payments/{paid}/refund", data=form)
        second = await admin_client.post(f"/admin/payments/{paid}/refund", data=form)
        assert first.status_code == second.status_code == 303
        assert first.headers["location"] == second.headers["location"]
        detail = await admin_client.get(first.headers["location"])
        assert detail.text.count('<tr id="refund-') == 1
        assert 'id="amount-refunded">€5.00<' in detail.text

    @pytest.mark.parametrize("amount", ["-1", "1.5", "1e3", "99999999", "abc"])
    async def test_bad_amounts_are_refused_and_refund_nothing(
        self, admin_client: httpx.AsyncClient, client: httpx.AsyncClient, token: Any, amount: str
    ) -> None:
        paid = (await create_payment(client, token=token("alice")))["payment_id"]
        await pay_in_sandbox(client, paid)
        page = await admin_client.get(f"/admin/payments/{paid}")
        refused = await admin_client.post(
            f"/admin/payments/{paid}/refund",
            data={
                "csrf_token": hidden(page),
                "idempotency_key": hidden(page, "idempotency_key"),
                "amount": amount,
            },
        )
        assert refused.status_code in (400, 422), refused.text
        assert "No refunds." in refused.text


class TestOtherPages:
    async def test_reconciliation_shows_the_backlog(
        self, admin_client: httpx.AsyncClient, client: httpx.AsyncClient, token: Any
    ) -> None:
        open_payment = (await create_payment(client, token=token("alice")))["payment_id"]
        page = await admin_client.get("/admin/reconciliation")
        assert page.status_code == 200
        assert f'href="/admin/payments/{open_payment}"' in page.text


class TestWebhookEndpoints:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "provider_secrets_key": Fernet.generate_key().decode(),
            "webhook_allow_private_urls": True,
            "webhook_worker_enabled": False,
        }

    async def test_the_merchants_endpoints_and_their_deliveries(
        self, admin_client: httpx.AsyncClient, token: Any
    ) -> None:
        created = await admin_client.post(
            "/api/v1/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/hooks", "description": "fulfilment"},
            headers=bearer(token("ops", admin=True)),
        )
        assert created.status_code == 201, created.text
        page = await admin_client.get("/admin/webhooks")
        assert page.status_code == 200
        assert created.json()["id"] in page.text and "http://127.0.0.1:9/hooks" in page.text
        assert created.json()["secret"] not in page.text  # shown once, to the API caller


class TestOnRedisCluster:
    """Sessions, the search indexes (each in a slot of its own) and the backlog on a
    3-master Redis Cluster."""

    @pytest.fixture
    def settings(self, redis_cluster: RedisClusterNodes, tmp_path: Path) -> Settings:
        redis_cluster.flush()
        return make_settings(
            redis_cluster.url,
            tmp_path / "receipts",
            redis_cluster=True,
            provider_secrets_key=KEY,
            rate_limits_enabled=False,
        )

    async def test_search_refund_and_backlog(
        self, admin_client: httpx.AsyncClient, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = [
            (await create_payment(client, token=token("alice")))["payment_id"] for _ in range(4)
        ]
        bob = (await create_payment(client, token=token("bob")))["payment_id"]
        await pay_in_sandbox(client, alice[1])
        found = await admin_client.get("/admin/payments", params={"user": "alice"})
        assert re.findall(r'<a href="/admin/payments/([^"]+)">', found.text) == alice[::-1]
        paid = await admin_client.get("/admin/payments", params={"status": "succeeded"})
        assert re.findall(r'<a href="/admin/payments/([^"]+)">', paid.text) == [alice[1]]
        page = await admin_client.get(f"/admin/payments/{alice[1]}")
        refunded = await admin_client.post(
            f"/admin/payments/{alice[1]}/refund",
            data={
                "csrf_token": hidden(page),
                "idempotency_key": hidden(page, "idempotency_key"),
            },
        )
        assert refunded.status_code == 303, refunded.text
        detail = await admin_client.get(refunded.headers["location"])
        assert 'id="payment-status">refunded<' in detail.text
        backlog = await admin_client.get("/admin/reconciliation")
        assert f'href="/admin/payments/{bob}"' in backlog.text


async def _keys(settings: Settings, pattern: str) -> list[str]:
    import redis.asyncio as aioredis

    async with aioredis.Redis.from_url(settings.redis_url, decode_responses=True) as redis:
        return [key async for key in redis.scan_iter(f"{settings.redis_key_prefix}{pattern}")]


async def _pttl(settings: Settings, key: str) -> int:
    import redis.asyncio as aioredis

    async with aioredis.Redis.from_url(settings.redis_url, decode_responses=True) as redis:
        return int(await redis.pttl(key))
