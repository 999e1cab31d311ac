"""`payments`, the command line, run as a real process the way an operator runs it:
``python -m app.cli`` against the suite's Redis, from a directory with no .env file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from jose import jwt
from redis.asyncio import Redis

from app.security import decode_access_token
from app.settings import Settings
from services.errors import InvalidToken
from services.events.endpoints import EndpointStore, SecretRotation, WebhookEndpointIn
from services.events.urls import UrlGuard
from services.provider_configs import ProviderConfigStore, SecretBox
from services.receipt_ledger import ReceiptLedger, Series
from services.receipt_service import document_path
from tests.conftest import JWT_SECRET, RedisServer

ROOT = Path(__file__).resolve().parents[1]

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(redis_server: RedisServer, tmp_path: Path) -> Cli:
    redis_server.flush()  # no stored configuration or routing left by another test

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=tmp_path,  # no .env here: the developer's own settings stay out
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "REDIS_URL": redis_server.url,
                "REDIS_KEY_PREFIX": "test:",
                "JWT_SECRET_KEY": JWT_SECRET,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def _settings(jwt_secret_key: str) -> Settings:
    return Settings(_env_file=None, jwt_secret_key=jwt_secret_key)


class TestProviders:
    def test_list(self, cli: Cli) -> None:
        done = cli("providers", "list")
        assert done.returncode == 0, done.stderr
        header, *lines = done.stdout.splitlines()
        assert header.split() == ["provider", "configured", "active", "prefixes", "capabilities"]
        rows = {line.split()[0]: line.split()[1:] for line in lines}
        assert rows["sandbox"][:3] == ["true", "true", "sb_"]
        assert rows["sandbox"][-1] == "(default)"
        assert rows["stripe"][:2] == ["false", "false"]
        assert {"paypal", "mobilepay", "googlepay", "applepay"} <= set(rows)

    @pytest.mark.parametrize(
        ("key", "why"),
        [
            (None, "PROVIDER_SECRETS_KEY is unset"),
            (Fernet.generate_key().decode(), "PROVIDER_SECRETS_KEY is wrong"),
        ],
        ids=["unset", "wrong"],
    )
    async def test_list_says_when_stored_configs_cannot_be_read(
        self, cli: Cli, redis_server: RedisServer, key: str | None, why: str
    ) -> None:
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await ProviderConfigStore(
                redis, prefix="test:", box=SecretBox(Fernet.generate_key().decode())
            ).create(
                provider_key="stripe",
                service_type="payment",
                config={},
                secrets_={"secret_key": "sk_test_stored0123456789"},
                capabilities=None,
            )
        finally:
            await redis.aclose()
        done = cli("providers", "list", **({"PROVIDER_SECRETS_KEY": key} if key else {}))
        assert done.returncode == 0, done.stderr
        (said,) = [line for line in done.stderr.splitlines() if line.startswith("degraded: ")]
        assert said.startswith(f"degraded: stored provider configs cannot be decrypted: {why}")
        assert said.endswith("; 1 config ignored and its provider held out (stripe)")
        rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
        assert rows["stripe"][:2] == ["false", "false"]

    def test_test_checks_every_active_provider(self, cli: Cli) -> None:
        done = cli("providers", "test")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("sandbox: ok built-in sandbox (")
        assert "stripe" not in done.stdout  # not configured, so not active: not checked

    def test_test_of_an_unconfigured_provider_fails(self, cli: Cli) -> None:
        done = cli("providers", "test", "stripe")
        assert done.returncode == 1
        assert done.stdout.strip() == "stripe: FAIL not configured or deactivated"

    def test_test_of_an_unknown_provider_is_a_usage_error(self, cli: Cli) -> None:
        done = cli("providers", "test", "nope")
        assert done.returncode == 2
        assert done.stderr.splitlines()[-1].startswith(
            "payments: unknown_provider: No provider named 'nope'"
        )
        assert "Traceback" not in done.stderr


class TestSecrets:
    def test_secrets_key_prints_a_fernet_key(self, cli: Cli) -> None:
        done = cli("secrets-key")
        assert done.returncode == 0, done.stderr
        key = done.stdout.strip()
        assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"
        assert cli("secrets-key").stdout.strip() != key

    async def test_rotate_re_encrypts_stored_secrets_under_the_newest_key(
        self, cli: Cli, redis_server: RedisServer
    ) -> None:
        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            stored = await ProviderConfigStore(redis, prefix="test:", box=SecretBox(old)).create(
                provider_key="sandbox",
                service_type="payment",
                config={},
                secrets_={"webhook_secret": "sandbox-secret-0123456789"},
                capabilities=None,
            )
            done = cli("secrets", "rotate", PROVIDER_SECRETS_KEY=f"{new},{old}")
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == "re-encrypted 1 stored configuration(s)"
            only_new = ProviderConfigStore(redis, prefix="test:", box=SecretBox(new))
            assert await only_new.current_secrets(stored.id) == {
                "webhook_secret": "sandbox-secret-0123456789"
            }
        finally:
            await redis.aclose()

    async def test_rotate_re_encrypts_webhook_signing_secrets_too(
        self, cli: Cli, redis_server: RedisServer
    ) -> None:
        # The README's procedure: deploy NEW,OLD, rotate, deploy NEW alone. Deliveries are
        # then signed with secrets only NEW can read: they must be under NEW by then.
        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        guard = UrlGuard(allow_private=True, require_https=False)
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            before = EndpointStore(redis, prefix="test:", box=SecretBox(old), guard=guard)
            created = await before.create(WebhookEndpointIn(url="http://127.0.0.1:9/hooks"))
            rotated = await before.rotate_secret(created.id, SecretRotation(overlap_seconds=60))
            done = cli("secrets", "rotate", PROVIDER_SECRETS_KEY=f"{new},{old}")
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == [
                "re-encrypted 0 stored configuration(s)",
                "re-encrypted 1 webhook endpoint secret(s)",
            ]
            after = EndpointStore(redis, prefix="test:", box=SecretBox(new), guard=guard)
            fields = await redis.hgetall(after.key(created.id))
            assert after.signing_secrets(fields, now=datetime.now(UTC)) == [
                rotated.secret,
                created.secret,  # the previous one, for its overlap
            ]
        finally:
            await redis.aclose()


class TestPlansSync:
    def test_says_when_there_is_nothing_to_sync(self, cli: Cli) -> None:
        done = cli("plans", "sync")  # the default catalogue: one-off plans only
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            "nothing to sync: no recurring plan that an active subscription provider charges"
        )

    def test_syncs_a_recurring_plan_at_the_sandbox(self, cli: Cli) -> None:
        plan = {"name": "Pro", "amount": 2900, "currency": "EUR", "interval": "month"}
        done = cli("plans", "sync", PAYMENT_PLANS=json.dumps({"pro-monthly": plan}))
        assert done.returncode == 0, done.stderr
        ((provider, price, vendor_id),) = [line.split() for line in done.stdout.splitlines()]
        assert (provider, vendor_id[:5]) == ("sandbox", "sbpr_") and "pro-monthly" in price


class TestToken:
    def test_admin_token_decodes_with_the_same_secret(self, cli: Cli) -> None:
        done = cli("token", "--sub", "alice", "--admin", "--expires-minutes", "5")
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        user = decode_access_token(_settings(jwt_secret_key=JWT_SECRET), token)
        assert (user.sub, user.is_admin) == ("alice", True)
        claims = jwt.get_unverified_claims(token)
        assert claims["exp"] - claims["iat"] == 5 * 60
        with pytest.raises(InvalidToken):
            decode_access_token(_settings(jwt_secret_key="another-secret-" + "x" * 32), token)

    def test_plain_token_is_not_admin(self, cli: Cli) -> None:
        done = cli("token", "--sub", "bob")
        user = decode_access_token(_settings(jwt_secret_key=JWT_SECRET), done.stdout.strip())
        assert (user.sub, user.is_admin) == ("bob", False)


class TestBadSettings:
    @pytest.mark.parametrize(
        "args", [("token", "--sub", "alice"), ("providers", "list")], ids=["token", "providers"]
    )
    def test_exit_2_with_a_message_not_a_traceback(self, cli: Cli, args: tuple[str, ...]) -> None:
        done = cli(*args, PAYMENT_PLANS="not json")
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.startswith("payments: invalid settings:")
        assert "payment_plans" in done.stderr
        assert "Traceback" not in done.stderr

    def test_a_bad_provider_setting_is_named_without_its_value(self, cli: Cli) -> None:
        done = cli("providers", "list", STRIPE_PUBLISHABLE_KEY="pk_live_Qz7Kp4-Wm9Xv2")
        assert done.returncode == 2
        assert done.stderr.splitlines()[-2:] == [
            "payments: invalid settings:",
            "  stripe_publishable_key: String should match pattern '^pk_(test|live)_[A-Za-z0-9]+$'",
        ]

    def test_the_message_lists_the_problems_and_never_a_value(self, cli: Cli) -> None:
        secret = "recognisable-Qz7Kp4Wm9Xv2Lb8Nc5Rt1Yh6Jd3Fg0"
        done = cli("token", "--sub", "alice", ENVIRONMENT="production", JWT_SECRET_KEY=secret)
        assert done.returncode == 2
        assert done.stderr.splitlines()[-2:] == [
            "payments: invalid settings:",
            "  PAYMENT_PROVIDER=sandbox is refused in production",
        ]


class TestWhichRedis:
    def test_says_which_redis_it_read(self, cli: Cli, redis_server: RedisServer) -> None:
        done = cli("providers", "list")
        assert f"Redis: {redis_server.url}" in done.stderr

    def test_reads_the_redis_make_run_recorded_when_redis_url_is_unset(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "redis.url").write_text(redis_server.url + "\n")
        done = _cli_without_redis_url(tmp_path, "providers", "list")
        assert done.returncode == 0, done.stderr
        assert f"Redis: {redis_server.url}" in done.stderr

    async def test_receipts_verify_walks_the_chain_of_the_redis_make_run_recorded(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        redis_server.flush()
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            ledger = ReceiptLedger(redis, prefix="test:")
            document = await ledger.number(
                "sb_cli",
                series=Series.RECEIPT,
                year=2026,
                template="R-{year}-{seq:06d}",
                kind="receipt",
            )
            pdf = b"%PDF-1.7 a receipt"
            await ledger.record(document, hashlib.sha256(pdf).hexdigest(), at=datetime.now(UTC))
        finally:
            await redis.aclose()
        path = document_path(tmp_path / "var" / "receipts", "sb_cli")
        path.parent.mkdir(parents=True)
        path.write_bytes(pdf)
        (tmp_path / "var" / "redis.url").write_text(redis_server.url + "\n")
        # RECEIPTS_DIR is var/receipts in tmp_path, as under `make run` in the checkout.
        done = _cli_without_redis_url(tmp_path, "receipts", "verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"Redis: {redis_server.url}" in done.stderr
        assert done.stdout.strip() == "ok: 1 chain entries, 1 documents match"

    def test_a_password_is_never_printed(self, cli: Cli, redis_server: RedisServer) -> None:
        url = redis_server.url.replace("redis://", "redis://user:s3cret@")
        done = cli("providers", "list", REDIS_URL=url)
        assert "s3cret" not in done.stderr + done.stdout
        assert "user:****@" in done.stderr


def _cli_without_redis_url(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run in ``directory`` with REDIS_URL unset, as after `make run` there."""
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=directory,
        env={**env, "PYTHONPATH": str(ROOT), "REDIS_KEY_PREFIX": "test:"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
