"""One settings object, read from the environment (and an optional .env file)."""

from __future__ import annotations

import json
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.payment import CataloguePlan, SandboxBehaviour
from services.receipt_ledger import check_number_format

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"  # noqa: S105 - refused in production

DEFAULT_PLANS: dict[str, dict[str, object]] = {
    "basic": {"name": "Basic", "amount": 1900, "currency": "EUR"},
    "pro": {"name": "Pro", "amount": 2900, "currency": "EUR"},
    "expert": {"name": "Expert", "amount": 14900, "currency": "EUR"},
}


class Settings(BaseSettings):
    # Errors name the setting and what is wrong, never the value: pydantic would otherwise
    # echo the input (for the production check, every setting given, secrets included).
    # An empty value is no value (as for the providers' settings): `MERCHANT_NAME=` in a .env
    # made from .env.example keeps the default instead of printing an empty seller.
    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
        env_ignore_empty=True,
    )

    environment: Literal["development", "test", "production"] = "development"
    port: int = 8000
    # /metrics without a token on this port (every worker binds it), on METRICS_HOST: a
    # private address, never a public one. Unset: /metrics only on the API port, for admins.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # OpenTelemetry traces to this OTLP/HTTP collector (http://collector:4318); unset: none.
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "payment-service"
    public_base_url: str | None = Field(
        default=None, description="How clients reach the service; defaults to the request's"
    )
    log_level: str = "INFO"

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis Cluster: REDIS_URL names any one of its nodes, the client finds the rest.
    redis_cluster: bool = False
    redis_key_prefix: str = "payments:"
    redis_timeout_seconds: float = 2.0

    jwt_secret_key: SecretStr = SecretStr(DEV_JWT_SECRET)
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_access_token_expire_minutes: int = 30

    payment_provider: str = "sandbox"
    payment_plans: dict[str, dict[str, object]] = Field(default_factory=lambda: DEFAULT_PLANS)

    # The seller named on receipts and credit notes.
    merchant_name: str = "Example Merchant Ltd"
    merchant_address: str = "1 Example Street, 10115 Berlin, Germany"
    merchant_vat_id: str | None = None
    # ISO 3166 alpha-2; where reverse charge compares the buyer's VAT id with. Defaults to
    # the country prefix of MERCHANT_VAT_ID.
    merchant_country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    merchant_email: str | None = None
    merchant_website: str | None = None
    # Gapless per series and year; {year} and {seq} (e.g. {seq:06d}) are filled in.
    receipt_number_format: str = "R-{year}-{seq:06d}"
    credit_note_number_format: str = "CN-{year}-{seq:06d}"
    receipt_locale: Literal["en", "de"] = "en"
    # Tax on receipts: TAX_RATE percent (a plan's own tax_rate in PAYMENT_PLANS wins), named
    # TAX_NAME. With PRICES_INCLUDE_TAX the catalogue price is what the buyer pays, tax
    # included; without it, tax is added on top at checkout.
    prices_include_tax: bool = True
    tax_rate: Decimal = Field(default=Decimal(0), ge=0, lt=100)
    tax_name: str = Field(default="VAT", min_length=1, max_length=40)
    # No tax charged to a buyer who gives a VAT id of another country than the seller's.
    reverse_charge_enabled: bool = False
    # PAdES signatures on receipts and credit notes: a PEM private key and its PEM
    # certificate (chain), as text or as a path to a file. Unsigned without them.
    receipt_signing_key: SecretStr | None = None
    receipt_signing_cert: str | None = None
    receipts_dir: Path = Path("var/receipts")
    receipt_render_workers: int = Field(default=1, ge=1, le=32)
    receipt_warm_up: bool = True
    receipt_memory_cache_bytes: int = 16 * 1024 * 1024

    # The admin dashboard (/admin): how long a sign-in lasts at most (never longer than the
    # token it was made from).
    admin_session_ttl_seconds: int = Field(default=3600, ge=60, le=86_400)

    rate_limits_enabled: bool = True
    # Reverse proxies whose X-Forwarded-For names the client (IPs or CIDR networks,
    # comma-separated). Empty: no proxy is trusted, the client is the connection's peer.
    forwarded_allow_ips: Annotated[list[IPvAnyNetwork], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 64 * 1024
    max_webhook_body_bytes: int = 1024 * 1024

    stripe_secret_key: SecretStr | None = None
    stripe_publishable_key: str | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str = "https://api.stripe.com"

    paypal_client_id: str | None = None
    paypal_client_secret: SecretStr | None = None
    paypal_mode: Literal["sandbox", "live"] = "sandbox"
    paypal_webhook_id: str | None = None
    paypal_api_base: str | None = None

    # An Idempotency-Key's claim is taken for this long and renewed while its request runs,
    # so it outlives every provider attempt of a slow create or refund, and lapses this long
    # after a worker that died holding it.
    idempotency_lease_seconds: float = Field(default=30.0, ge=0.2, le=3600)
    # Hosts that return_url / cancel_url may send the customer back to (comma-separated; a
    # leading "." admits subdomains). Empty: only PUBLIC_BASE_URL's host.
    return_url_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Fernet keys for stored provider secrets, comma-separated, newest first (rotation).
    provider_secrets_key: SecretStr | None = None
    provider_timeout_seconds: float = 10.0
    # The most one provider operation may take, its own retries included.
    provider_deadline_seconds: float = 30.0
    # Providers tried, in order, when the default is unconfigured, its circuit is open, or it
    # failed before the request reached it. A provider named in the request is never swapped.
    payment_fallback: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A provider's circuit opens when, within the window, at least BREAKER_MIN_CALLS calls
    # were made and at least BREAKER_FAILURE_RATIO of them failed technically. The retired
    # BREAKER_FAILURE_THRESHOLD (a count of failures) is still read, as the minimum of calls.
    breaker_min_calls: int = Field(
        default=20,
        ge=1,
        validation_alias=AliasChoices("breaker_min_calls", "breaker_failure_threshold"),
    )
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_window_seconds: float = Field(default=30.0, gt=0)
    breaker_cooldown_seconds: float = Field(default=15.0, gt=0)

    # Reconciliation: one worker (the leader, by a Redis lock) re-verifies payments that are
    # still open, or whose last operation's outcome is unknown, after each of these delays
    # (seconds; 1 min, 10 min, 1 h, 1 day by default), then gives up and logs it.
    reconcile_enabled: bool = True
    reconcile_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [60.0, 600.0, 3600.0, 86400.0], min_length=1
    )
    reconcile_interval_seconds: float = Field(default=5.0, gt=0)
    reconcile_batch: int = Field(default=50, ge=1, le=1000)

    # Subscriptions: how long a past_due subscription still entitles its owner (days), and
    # whether an upgrade is charged in full now ("none") or prorated by the vendor ("vendor").
    subscription_grace_days: int = Field(default=7, ge=0, le=90)
    subscription_proration: Literal["none", "vendor"] = "none"
    # Sync recurring plans to the vendors that bill subscriptions at start-up (background).
    plan_sync_on_start: bool = True
    # Events for the merchant's backend (services/events). Endpoints resolving to loopback,
    # private or link-local addresses are refused unless WEBHOOK_ALLOW_PRIVATE_URLS (never in
    # production, where endpoints must also be https).
    webhook_allow_private_urls: bool = False
    # The delivery worker (every app process runs one; any of them may deliver any event).
    webhook_worker_enabled: bool = True
    # Seconds between a failed attempt and the next, then given up: about 3 days in all.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5, 300, 1800, 7200, 18000, *([36000.0] * 6), 18000],
        min_length=1,
    )
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=30)
    # A delivery's lease: how long a worker may hold one before another takes it over.
    webhook_claim_idle_seconds: float = Field(default=60.0, gt=0)
    webhook_poll_interval_seconds: float = Field(default=1.0, gt=0)
    webhook_sweep_interval_seconds: float = Field(default=5.0, gt=0)
    # How old an outbox entry is before the sweep relays it (the fast path does it at once).
    webhook_sweep_grace_seconds: float = Field(default=30.0, ge=0)
    webhook_log_size: int = Field(default=1000, ge=10, le=100_000)
    webhook_retention_seconds: int = Field(default=7 * 86400, ge=3600)

    # Signs the sandbox's own webhooks. The sandbox never runs in production.
    sandbox_webhook_secret: SecretStr = SecretStr("sandbox-webhook-secret")
    # Faults for every sandbox payment that brings none of its own (JSON, as create-intent's
    # `sandbox` object), e.g. {"fail": "unavailable"} to rehearse a provider outage.
    sandbox_behaviour: dict[str, Any] | None = None

    @field_validator("receipt_number_format", "credit_note_number_format")
    @classmethod
    def _number_format(cls, value: str) -> str:
        return check_number_format(value)

    @model_validator(mode="after")
    def _signing_needs_both(self) -> Settings:
        if bool(self.receipt_signing_key) != bool(self.receipt_signing_cert):
            raise ValueError("RECEIPT_SIGNING_KEY and RECEIPT_SIGNING_CERT go together")
        return self

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix_leaves_hash_tags_alone(cls, value: str) -> str:
        # Redis Cluster hashes a key's first {...} only: a brace in the prefix would decide the
        # slot of every key instead of the keys' own hash tags.
        if "{" in value or "}" in value:
            raise ValueError("REDIS_KEY_PREFIX must not contain '{' or '}'")
        return value

    @model_validator(mode="after")
    def _cluster_has_one_database(self) -> Settings:
        database = urlsplit(self.redis_url).path.strip("/")
        if self.redis_cluster and database not in ("", "0"):
            raise ValueError("REDIS_URL names a database other than 0: a Redis Cluster has only 0")
        return self

    @field_validator("payment_fallback", mode="before")
    @classmethod
    def _fallback_list(cls, value: object) -> object:
        # PAYMENT_FALLBACK=stripe,paypal as well as a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _proxy_list(cls, value: object) -> object:
        # FORWARDED_ALLOW_IPS=10.0.0.0/8,192.0.2.7 (uvicorn's own spelling) or a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("return_url_hosts", mode="before")
    @classmethod
    def _hosts_list(cls, value: object) -> object:
        # RETURN_URL_HOSTS=shop.example,.example.org as well as a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [host.strip() for host in text.split(",") if host.strip()]
        return value

    @field_validator("return_url_hosts")
    @classmethod
    def _hosts_lower(cls, value: list[str]) -> list[str]:
        return [host.lower() for host in value]

    @property
    def redirect_hosts(self) -> frozenset[str]:
        """Where return_url / cancel_url may point: the listed hosts, else the service's own
        public host (a request's own host when PUBLIC_BASE_URL is unset, see the service)."""
        hosts = set(self.return_url_hosts)
        if not hosts and self.public_base_url:
            hosts.add((urlsplit(self.public_base_url).hostname or "").lower())
        return frozenset(hosts - {""})

    @field_validator("reconcile_schedule", mode="before")
    @classmethod
    def _schedule_list(cls, value: object) -> object:
        # RECONCILE_SCHEDULE=60,600,3600 as well as a JSON list.
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split(",")
        return value

    @field_validator("reconcile_schedule")
    @classmethod
    def _schedule_positive(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("RECONCILE_SCHEDULE delays must be positive seconds")
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _webhook_schedule_list(cls, value: object) -> object:
        # WEBHOOK_RETRY_SCHEDULE=5,300,1800 as well as a JSON list.
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split(",")
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _webhook_schedule_positive(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE delays must be positive seconds")
        return value

    @model_validator(mode="after")
    def _webhook_lease_outlasts_attempt(self) -> Settings:
        if self.webhook_claim_idle_seconds <= self.webhook_timeout_seconds:
            raise ValueError("WEBHOOK_CLAIM_IDLE_SECONDS must exceed WEBHOOK_TIMEOUT_SECONDS")
        if sum(self.webhook_retry_schedule) >= self.webhook_retention_seconds:
            raise ValueError("WEBHOOK_RETENTION_SECONDS must exceed the retry schedule")
        return self

    @field_validator("sandbox_behaviour")
    @classmethod
    def _sandbox_behaviour(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else SandboxBehaviour.model_validate(value).model_dump()

    @field_validator("payment_plans")
    @classmethod
    def _plans_parse(cls, value: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        if not value:
            raise ValueError("PAYMENT_PLANS must name at least one plan")
        for code, fields in value.items():
            CataloguePlan.model_validate({"code": code, **fields})
        return value

    @model_validator(mode="after")
    def _production_is_safe(self) -> Settings:
        if self.environment != "production":
            return self
        problems = []
        secret = self.jwt_secret_key.get_secret_value()
        if secret == DEV_JWT_SECRET or len(secret) < 32:
            problems.append("JWT_SECRET_KEY must be set to a random value of 32+ characters")
        if self.payment_provider == "sandbox":
            problems.append("PAYMENT_PROVIDER=sandbox is refused in production")
        if self.stripe_secret_key and not self.stripe_webhook_secret:
            problems.append("STRIPE_WEBHOOK_SECRET is required when Stripe is configured")
        if self.paypal_client_id and not self.paypal_webhook_id:
            problems.append("PAYPAL_WEBHOOK_ID is required when PayPal is configured")
        if self.webhook_allow_private_urls:
            problems.append("WEBHOOK_ALLOW_PRIVATE_URLS is for development and tests only")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def provider_secrets_key_value(self) -> str | None:
        return self.provider_secrets_key.get_secret_value() if self.provider_secrets_key else None

    @cached_property
    def plans(self) -> dict[str, CataloguePlan]:
        return {
            code: CataloguePlan.model_validate({"code": code, **fields})
            for code, fields in self.payment_plans.items()
        }


def settings_problems(error: ValidationError) -> list[str]:
    """What is wrong with the settings, one line a problem: the setting and what is wrong
    with it, never its value (which may be a secret)."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return problems
