"""The floors' Stripe client: built as StripeProvider builds its own."""

from __future__ import annotations

import os

import stripe

from services.payment_providers.stripe.provider import _HTTPX2Client


def stripe_client_from_env() -> tuple[_HTTPX2Client | None, stripe.StripeClient | None]:
    """Our HTTPClient and a StripeClient over it, for the fake at ``FLOOR_STRIPE_URL`` with
    ``FLOOR_STRIPE_KEY`` (base address, no SDK retries); (None, None) when it is not set."""
    url = os.environ.get("FLOOR_STRIPE_URL")
    if not url:
        return None, None
    http = _HTTPX2Client(timeout=10.0)
    client = stripe.StripeClient(
        os.environ["FLOOR_STRIPE_KEY"],
        base_addresses={"api": url.rstrip("/")},
        http_client=http,
        max_network_retries=0,
    )
    return http, client
