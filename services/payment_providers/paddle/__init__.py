"""Paddle Billing, a merchant of record: transactions paid on Paddle Checkout, refunds as
adjustments Paddle approves later, and ``Paddle-Signature`` webhooks, over the REST API with
the shared async HTTP client. ``provider`` makes the calls; ``transformers`` converts between
Paddle's JSON and our types.
"""

from .provider import PaddleProvider

__all__ = ["PaddleProvider"]
