"""The floor: a bare FastAPI app on the service's server stack that does exactly the Redis work
each endpoint must do, in the fewest round trips, and nothing else.

No token check, no validation beyond reading the JSON body, no provider layer, no logging:
what is left is uvicorn + FastAPI routing + one Redis round trip + a JSON answer. The service's
figures are read as a fraction of these.

It serves the same paths as the service, so the same wrk scripts drive both:

- ``POST /api/v1/payment/create-intent``: one Lua script (one round trip) that claims the
  idempotency key and, when the key is new, writes the payment hash, its history entry, the
  sandbox session and the reference index, the same keys and fields the service writes.
- ``POST /api/v1/payment/create-intent-3rt``: the Redis work create-intent does through the
  service's own store, in its three round trips and nothing else: the idempotency claim
  (``PaymentStore.idempotency_begin``), the sandbox's session (a script shaped as the sandbox's
  own), then ``PaymentStore.create`` with the answer to replay and the reconciliation entry.
  What the service adds beyond it (token, validation, catalogue and tax, the provider layer
  with its deadline, breaker and metrics, middleware) is the service's own cost; what it adds
  beyond the redis-py floor is what the design's round trips and FastAPI cost.
- ``POST /api/v1/payment/create-intent-stripe-3rt``: the same with the Stripe call in the
  middle instead of the sandbox's session (the redis-py floor's call: the provider's parameter
  builder, ``stripe.StripeClient`` over the provider's ``HTTPClient``), to the fake at
  ``FLOOR_STRIPE_URL``.
- ``POST /api/v1/payment/verify``: one pipeline reading the payment and its sandbox session.
- ``GET /api/v1/payment/receipt/{id}``: one HGETALL.
- ``GET /api/v1/payment/receipt/{id}/pdf``: the bytes of ``FLOOR_PDF_PATH``, from memory.
- ``GET /api/v1/payment/receipt/{id}/file``: the same file through Starlette's FileResponse.

Since this round it is the reference floor for create-intent and verify (FastAPI, and the
service's key layout of before the restructure); their targets are read against the redis-py
floor, ``bench/floor_redispy.py``. Receipt metadata and the PDF are still read against this one.

Environment: REDIS_URL, REDIS_KEY_PREFIX, FLOOR_PDF_PATH, FLOOR_STRIPE_URL, FLOOR_STRIPE_KEY.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import stripe
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse
from redis.asyncio import Redis

from bench.floor_stripe import stripe_client_from_env
from models.payment import (
    IntentResponse,
    PaymentRecord,
    PaymentStatus,
    Plan,
    ProviderAttempt,
)
from services.payment_providers.base import IntentRequest
from services.payment_providers.stripe import transformers as stripe_tx
from services.payment_store import (
    IdempotencyAnswer,
    IdempotencyState,
    PaymentStore,
    redis_client,
)

PLANS = {
    "basic": ("Basic", 1900, "EUR"),
    "pro": ("Pro", 2900, "EUR"),
    "expert": ("Expert", 14900, "EUR"),
}
SESSION_TTL_S = 30 * 24 * 3600
IDEMPOTENCY_TTL_S = 86_400

# KEYS: idempotency hash, payment hash, history list, sandbox session, reference index.
# ARGV: fingerprint, response, idempotency TTL, history entry, session TTL, payment ID,
#       n (items of payment fields), payment field/value items..., session field/value items...
_CREATE_LUA = """
local found = redis.call('HMGET', KEYS[1], 'fingerprint', 'response')
if found[1] then
  if found[1] ~= ARGV[1] then return {'mismatch', ''} end
  return {'done', found[2] or ''}
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'done', 'response', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local n = tonumber(ARGV[7])
redis.call('HSET', KEYS[2], unpack(ARGV, 8, 7 + n))
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[4], unpack(ARGV, 8 + n, #ARGV))
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('SET', KEYS[5], ARGV[6])
return {'new', ''}
"""

# KEYS: session hash. ARGV: TTL, fields (one JSON object). As the sandbox opens a session.
_SESSION_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local flat = {}
for field, value in pairs(cjson.decode(ARGV[2])) do
  flat[#flat + 1] = field
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
RECONCILE_AFTER_S = 600.0

PREFIX = os.environ.get("REDIS_KEY_PREFIX", "payments:")
_pdf: bytes | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The same client, configured as the service configures its own (app/main.py).
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=30,
    )
    app.state.redis = redis
    app.state.create = redis.register_script(_CREATE_LUA)
    # The three-round-trip endpoints use the service's own client and store.
    ours = redis_client(url, cluster=False, timeout_s=2.0)
    app.state.store = PaymentStore(ours, prefix=PREFIX)
    app.state.session = ours.register_script(_SESSION_LUA)
    app.state.stripe_http, app.state.stripe = stripe_client_from_env()
    try:
        yield
    finally:
        if app.state.stripe_http is not None:
            await app.state.stripe_http.close_async()
        await ours.aclose()
        await redis.aclose()


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


def _json(data: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status_code, media_type="application/json")


def _payment_key(payment_id: str) -> str:
    return f"{PREFIX}pay:{{{payment_id}}}"


def _flat(fields: dict[str, Any]) -> list[str]:
    return [str(item) for pair in fields.items() for item in pair]


async def _create(request: Request) -> Response:
    raw = await request.body()
    body = json.loads(raw)
    name, amount, currency = PLANS[body["plan"]]
    key = request.headers.get("idempotency-key") or secrets.token_hex(16)
    payment_id = "sb_" + hashlib.sha256(f"floor\0{key}".encode()).hexdigest()[:24]
    reference = f"ord_{secrets.token_hex(12)}"
    now = datetime.now(UTC).isoformat()
    redirect_url = f"{request.base_url}sandbox/checkout/{payment_id}"
    response = {
        "payment_id": payment_id,
        "status": "pending",
        "plan": body["plan"],
        "amount": amount,
        "currency": currency,
        "provider": "sandbox",
        "redirect_url": redirect_url,
        "client_secret": None,
        "publishable_key": None,
    }
    encoded = json.dumps(response)
    payment = {
        "payment_id": payment_id,
        "provider": "sandbox",
        "reference": reference,
        "plan": body["plan"],
        "amount": amount,
        "currency": currency,
        "status": "pending",
        "owner": "bench-user",
        "redirect_url": redirect_url,
        "amount_refunded": 0,
        "attempts": json.dumps([{"provider": "sandbox", "outcome": "succeeded"}]),
        "created_at": now,
        "updated_at": now,
    }
    session = {
        "status": "open",
        "amount": amount,
        "currency": currency,
        "plan": body["plan"],
        "plan_name": name,
        "reference": reference,
        "return_url": "",
        "cancel_url": "",
        "capture_method": "automatic",
        "refunded": 0,
        "created_at": int(datetime.now(UTC).timestamp()),
    }
    entry = json.dumps({"at": now, "status": "pending", "previous": None, "cause": "api"})
    payment_items = _flat(payment)
    base = _payment_key(payment_id)
    state, stored = await request.app.state.create(
        keys=[
            f"{PREFIX}idem:{{floor:{key}}}",
            base,
            f"{base}:history",
            f"{PREFIX}sandbox:{{{payment_id}}}",
            f"{PREFIX}ref:{{{reference}}}",
        ],
        args=[
            hashlib.sha256(raw).hexdigest(),
            encoded,
            IDEMPOTENCY_TTL_S,
            entry,
            SESSION_TTL_S,
            payment_id,
            len(payment_items),
            *payment_items,
            *_flat(session),
        ],
    )
    if state == "mismatch":
        return _json({"code": "idempotency_key_reused"}, 422)
    return Response(
        stored if state == "done" else encoded, status_code=201, media_type="application/json"
    )


@app.post("/api/v1/payment/create-intent")
async def create_intent(request: Request) -> Response:
    return await _create(request)


SCOPE = "user:bench-user"
PLAN_MODELS = {
    code: Plan(code=code, name=name, amount=amount, currency=currency)
    for code, (name, amount, currency) in PLANS.items()
}


async def _claim(request: Request) -> tuple[str, str, Response | None]:
    """Round trip 1: claim the request's Idempotency-Key. The plan asked for, the key, and
    the answer when the key is not ours to run."""
    raw = await request.body()
    plan = json.loads(raw)["plan"]
    key = request.headers.get("idempotency-key") or secrets.token_hex(16)
    store: PaymentStore = request.app.state.store
    begin = await store.idempotency_begin(SCOPE, key, hashlib.sha256(raw).hexdigest())
    if begin.state is IdempotencyState.MISMATCH:
        return plan, key, _json({"code": "idempotency_key_reused"}, 422)
    if begin.state is not IdempotencyState.NEW:
        return plan, key, _json(begin.response, 201)
    return plan, key, None


async def _store_created(
    request: Request,
    key: str,
    plan: str,
    provider: str,
    payment_id: str,
    reference: str,
    redirect_url: str | None,
) -> Response:
    """Round trip 3: the payment, its answer to replay and its reconciliation entry."""
    _name, amount, currency = PLANS[plan]
    now = datetime.now(UTC)
    record = PaymentRecord(
        payment_id=payment_id,
        provider=provider,
        reference=reference,
        plan=plan,
        amount=amount,
        currency=currency,
        status=PaymentStatus.PENDING,
        owner="bench-user",
        redirect_url=redirect_url,
        attempts=[ProviderAttempt(provider=provider, outcome="succeeded", at=now)],
        created_at=now,
        updated_at=now,
    )
    response = IntentResponse(
        payment_id=payment_id,
        status=record.status,
        plan=plan,
        amount=amount,
        currency=currency,
        provider=provider,
        redirect_url=redirect_url,
    )
    await request.app.state.store.create(
        record,
        cause="api:create-intent",
        idempotency=IdempotencyAnswer(SCOPE, key, response.model_dump(mode="json")),
        reconcile_after_s=RECONCILE_AFTER_S,
    )
    return Response(response.model_dump_json(), status_code=201, media_type="application/json")


@app.post("/api/v1/payment/create-intent-3rt")
async def create_intent_in_three_round_trips(request: Request) -> Response:
    plan, key, answered = await _claim(request)
    if answered is not None:
        return answered
    name, amount, currency = PLANS[plan]
    payment_id = "sb_" + hashlib.sha256(f"floor3\0{key}".encode()).hexdigest()[:24]
    reference = f"ord_{secrets.token_hex(12)}"
    session = {
        "status": "open",
        "amount": amount,
        "currency": currency,
        "plan": plan,
        "plan_name": name,
        "reference": reference,
        "capture_method": "automatic",
        "created_at": int(datetime.now(UTC).timestamp()),
    }
    await request.app.state.session(  # round trip 2: the sandbox's session
        keys=[f"{PREFIX}sandbox:{{{payment_id}}}"],
        args=[SESSION_TTL_S, json.dumps({k: str(v) for k, v in session.items()})],
    )
    redirect_url = f"{request.base_url}sandbox/checkout/{payment_id}"
    return await _store_created(request, key, plan, "sandbox", payment_id, reference, redirect_url)


@app.post("/api/v1/payment/create-intent-stripe-3rt")
async def create_intent_at_stripe_in_three_round_trips(request: Request) -> Response:
    client: stripe.StripeClient | None = request.app.state.stripe
    if client is None:
        return _json({"code": "provider_not_configured"}, 503)
    plan, key, answered = await _claim(request)
    if answered is not None:
        return answered
    reference = f"ord_{secrets.token_hex(12)}"
    intent = IntentRequest(
        reference=reference,
        plan=PLAN_MODELS[plan],
        idempotency_key=hashlib.sha256(f"floor3\0{key}".encode()).hexdigest()[:40],
        base_url=str(request.base_url),
        user_id="bench-user",
    )
    params = stripe_tx.checkout_session_params(intent, capture_method="automatic")
    try:  # round trip 2: Stripe
        session = await client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": intent.idempotency_key}
        )
    except stripe.StripeError as error:
        return _json({"code": "provider_error", "error": type(error).__name__}, 502)
    return await _store_created(request, key, plan, "stripe", session.id, reference, session.url)


@app.post("/api/v1/payment/verify")
async def verify(request: Request) -> Response:
    payment_id = json.loads(await request.body())["payment_id"]
    async with request.app.state.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(_payment_key(payment_id))
        pipe.hgetall(f"{PREFIX}sandbox:{{{payment_id}}}")
        payment, session = await pipe.execute()
    if not payment or not session:
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
            "amount_refunded": int(session.get("refunded", 0)),
            "receipt_url": f"/api/v1/payment/receipt/{payment_id}/pdf" if paid else None,
        }
    )


@app.get("/api/v1/payment/receipt/{payment_id}")
async def receipt(payment_id: str, request: Request) -> Response:
    payment = await request.app.state.redis.hgetall(_payment_key(payment_id))
    if not payment:
        return _json({"code": "payment_not_found"}, 404)
    return _json(
        {
            "payment_id": payment_id,
            "plan": payment["plan"],
            "amount": int(payment["amount"]),
            "currency": payment["currency"],
            "status": payment["status"],
            "paid_at": payment.get("paid_at"),
            "pdf_url": f"/api/v1/payment/receipt/{payment_id}/pdf",
        }
    )


def _pdf_path() -> str:
    return os.environ["FLOOR_PDF_PATH"]


@app.get("/api/v1/payment/receipt/{payment_id}/pdf")
async def receipt_pdf_from_memory(payment_id: str) -> Response:
    global _pdf
    if _pdf is None:
        with open(_pdf_path(), "rb") as handle:  # noqa: ASYNC230 - once per process
            _pdf = handle.read()
    return Response(
        _pdf,
        media_type="application/pdf",
        headers={
            "Content-Disposition": 'attachment; filename="receipt.pdf"',
            "Cache-Control": "private, max-age=3600",
        },
    )


@app.get("/api/v1/payment/receipt/{payment_id}/file")
async def receipt_pdf_from_file(payment_id: str) -> FileResponse:
    return FileResponse(_pdf_path(), media_type="application/pdf", filename="receipt.pdf")


@app.get("/health")
async def health() -> Response:
    return _json({"status": "ok"})
