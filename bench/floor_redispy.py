"""The redis-py floor: a bare Starlette app that does each endpoint's Redis work in one round
trip through redis-py's public API, and nothing else.

No FastAPI, no token check, no validation beyond reading the JSON body, no provider layer, no
logging: what is left is uvicorn + Starlette routing + one redis-py call + a JSON answer. The
service's create-intent and verify are graded as a fraction of these (bench/harness.py).

- ``POST /api/v1/payment/create-intent``: one EVALSHA of a script registered with
  ``register_script`` (redis-py sends the digest; it loads the script only if Redis answers
  NOSCRIPT). It claims the idempotency key and, when the key is new, stores the answer to
  replay and writes the payment hash, its history entry, the sandbox's session and the
  reference: what the service writes for a sandbox payment. Every key carries the payment's
  hash tag, so the same single EVALSHA runs on a Redis Cluster too (``REDIS_CLUSTER=true``).
- ``POST /api/v1/payment/verify``: one HGETALL of the payment hash the service wrote.
- ``POST /api/v1/payment/create-intent-sleep``: create-intent after ``FLOOR_SLEEP_MS``, standing
  for a provider that answers in that time (provider-latency bench, for reference).
- ``POST /api/v1/payment/create-intent-stripe``: the service's Stripe call made bare, then
  create-intent's EVALSHA for that session: the same Checkout Session parameters (built by the
  provider's own transformer) sent with the same client, ``stripe.StripeClient`` over the
  provider's httpx2-backed ``HTTPClient``, to the fake at ``FLOOR_STRIPE_URL`` (the
  provider-latency target's floor).

Environment: REDIS_URL, REDIS_CLUSTER, REDIS_KEY_PREFIX, FLOOR_SLEEP_MS, FLOOR_STRIPE_URL,
FLOOR_STRIPE_KEY.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import stripe
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from bench.floor_stripe import stripe_client_from_env
from models.payment import Plan
from services.payment_providers.base import IntentRequest
from services.payment_providers.stripe import transformers as stripe_tx
from services.payment_store import redis_client

PLANS = {
    "basic": Plan(code="basic", name="Basic", amount=1900, currency="EUR"),
    "pro": Plan(code="pro", name="Pro", amount=2900, currency="EUR"),
    "expert": Plan(code="expert", name="Expert", amount=14900, currency="EUR"),
}
SESSION_TTL_S = 30 * 24 * 3600
IDEMPOTENCY_TTL_S = 86_400
PREFIX = os.environ.get("REDIS_KEY_PREFIX", "payments:")
API = "/api/v1/payment"

# KEYS: idempotency hash, payment hash, history list, sandbox session hash, reference (one
# hash tag: the payment's). ARGV: request fingerprint, answer to replay, idempotency TTL,
# payment fields (JSON object), history entry, session fields (JSON object, '' for none),
# session TTL, payment ID.
_CREATE_LUA = """
local found = redis.call('HMGET', KEYS[1], 'fingerprint', 'response')
if found[1] then
  if found[1] ~= ARGV[1] then return {'mismatch', ''} end
  return {'done', found[2] or ''}
end
local function hset_json(key, encoded)
  local flat = {}
  for field, value in pairs(cjson.decode(encoded)) do
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
  redis.call('HSET', key, unpack(flat))
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'done', 'response', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
hset_json(KEYS[2], ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[5])
if ARGV[6] ~= '' then
  hset_json(KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[7])
end
redis.call('SET', KEYS[5], ARGV[8])
return {'new', ''}
"""


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # The service's own client constructor and options (services/payment_store.py).
    redis = redis_client(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        cluster=os.environ.get("REDIS_CLUSTER", "false").lower() == "true",
        timeout_s=2.0,  # the service's default REDIS_TIMEOUT_SECONDS
    )
    app.state.redis = redis
    app.state.create = redis.register_script(_CREATE_LUA)
    app.state.sleep_s = float(os.environ.get("FLOOR_SLEEP_MS", "50")) / 1000
    app.state.stripe_http, app.state.stripe = stripe_client_from_env()
    try:
        yield
    finally:
        if app.state.stripe_http is not None:
            await app.state.stripe_http.close_async()
        await redis.aclose()


def _json(data: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status_code, media_type="application/json")


def _payment_key(payment_id: str) -> str:
    return f"{PREFIX}pay:{{{payment_id}}}"


async def _store(
    request: Request,
    raw: bytes,
    plan: Plan,
    payment_id: str,
    provider: str,
    reference: str,
    redirect_url: str | None,
) -> Response:
    """The one EVALSHA of create-intent, and its answer."""
    now = datetime.now(UTC).isoformat()
    response = {
        "payment_id": payment_id,
        "status": "pending",
        "plan": plan.code,
        "amount": plan.amount,
        "currency": plan.currency,
        "provider": provider,
        "redirect_url": redirect_url,
        "client_secret": None,
        "publishable_key": None,
    }
    encoded = json.dumps(response)
    payment = {
        "payment_id": payment_id,
        "provider": provider,
        "reference": reference,
        "plan": plan.code,
        "amount": str(plan.amount),
        "currency": plan.currency,
        "status": "pending",
        "owner": "bench-user",
        "redirect_url": redirect_url or "",
        "amount_refunded": "0",
        "attempts": json.dumps([{"provider": provider, "outcome": "succeeded"}]),
        "created_at": now,
        "updated_at": now,
    }
    session = ""
    if provider == "sandbox":
        session = json.dumps(
            {
                "status": "open",
                "amount": str(plan.amount),
                "currency": plan.currency,
                "plan": plan.code,
                "plan_name": plan.name,
                "reference": reference,
                "capture_method": "automatic",
                "refunded": "0",
                "created_at": str(int(datetime.now(UTC).timestamp())),
            }
        )
    entry = json.dumps({"at": now, "status": "pending", "previous": None, "cause": "api"})
    base = _payment_key(payment_id)
    tag = f"{{{payment_id}}}"
    state, stored = await request.app.state.create(
        keys=[
            f"{PREFIX}floor:{tag}:idem",
            base,
            f"{base}:history",
            f"{PREFIX}floor:{tag}:session",
            f"{PREFIX}floor:{tag}:ref",
        ],
        args=[
            hashlib.sha256(raw).hexdigest(),
            encoded,
            IDEMPOTENCY_TTL_S,
            json.dumps(payment),
            entry,
            session,
            SESSION_TTL_S,
            reference,
        ],
    )
    if state == "mismatch":
        return _json({"code": "idempotency_key_reused"}, 422)
    return Response(
        stored if state == "done" else encoded, status_code=201, media_type="application/json"
    )


async def _create_sandbox(request: Request) -> Response:
    raw = await request.body()
    plan = PLANS[json.loads(raw)["plan"]]
    key = request.headers.get("idempotency-key") or secrets.token_hex(16)
    # As the sandbox does: the payment ID is derived from the key.
    payment_id = "sb_" + hashlib.sha256(f"floor\0{key}".encode()).hexdigest()[:24]
    return await _store(
        request,
        raw,
        plan,
        payment_id,
        "sandbox",
        f"ord_{secrets.token_hex(12)}",
        f"{request.base_url}sandbox/checkout/{payment_id}",
    )


async def create_intent(request: Request) -> Response:
    return await _create_sandbox(request)


async def create_intent_after_sleep(request: Request) -> Response:
    await asyncio.sleep(request.app.state.sleep_s)
    try:
        return await _create_sandbox(request)
    except ClientDisconnect:
        # wrk drops its connections when a run ends, waiting requests included: nobody is
        # left to answer (uvicorn would log a traceback for each).
        return Response(status_code=499)


async def create_intent_at_stripe(request: Request) -> Response:
    client: stripe.StripeClient | None = request.app.state.stripe
    if client is None:
        return _json({"code": "provider_not_configured"}, 503)
    try:
        raw = await request.body()
    except ClientDisconnect:
        return Response(status_code=499)
    plan = PLANS[json.loads(raw)["plan"]]
    key = request.headers.get("idempotency-key") or secrets.token_hex(16)
    reference = f"ord_{secrets.token_hex(12)}"
    intent = IntentRequest(
        reference=reference,
        plan=plan,
        idempotency_key=hashlib.sha256(f"floor\0{key}".encode()).hexdigest()[:40],
        base_url=str(request.base_url),
        user_id="bench-user",
    )
    params = stripe_tx.checkout_session_params(intent, capture_method="automatic")
    try:
        session = await client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": intent.idempotency_key}
        )
    except stripe.StripeError as error:
        return _json({"code": "provider_error", "error": type(error).__name__}, 502)
    return await _store(request, raw, plan, session.id, "stripe", reference, session.url)


async def verify(request: Request) -> Response:
    payment_id = json.loads(await request.body())["payment_id"]
    payment = await request.app.state.redis.hgetall(_payment_key(payment_id))
    if not payment:
        return _json({"code": "payment_not_found"}, 404)
    paid = payment["status"] in ("succeeded", "partially_refunded", "refunded")
    return _json(
        {
            "payment_id": payment_id,
            "status": payment["status"],
            "plan": payment["plan"],
            "amount": int(payment["amount"]),
            "currency": payment["currency"],
            "provider": payment["provider"],
            "amount_refunded": int(payment.get("amount_refunded", 0)),
            "amount_pending_refund": int(payment.get("amount_pending_refund", 0)),
            "receipt_url": f"{API}/receipt/{payment_id}/pdf" if paid else None,
        }
    )


async def health(request: Request) -> Response:
    return _json({"status": "ok"})


app = Starlette(
    routes=[
        Route(f"{API}/create-intent", create_intent, methods=["POST"]),
        Route(f"{API}/create-intent-sleep", create_intent_after_sleep, methods=["POST"]),
        Route(f"{API}/create-intent-stripe", create_intent_at_stripe, methods=["POST"]),
        Route(f"{API}/verify", verify, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)
