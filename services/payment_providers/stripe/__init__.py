"""Stripe: Checkout Sessions (hosted) and PaymentIntents (embedded) through the SDK's async
API. ``provider`` makes the calls; ``transformers`` converts between Stripe's objects and ours.

Inside this package ``import stripe`` is the SDK (absolute imports), not this package.
"""

from .provider import StripeProvider

__all__ = ["StripeProvider"]
