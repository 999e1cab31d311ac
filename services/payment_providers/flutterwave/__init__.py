"""Flutterwave (API v3, "Flutterwave Standard"): a hosted payment link made with
``POST /v3/payments``, the transaction verified by our ``tx_ref``, refunds through the
transaction refund endpoint, and webhooks that carry a shared secret (``verif-hash``) but no
signature. ``provider`` makes the calls; ``transformers`` converts between Flutterwave's JSON
and our types.
"""

from .provider import FlutterwaveProvider

__all__ = ["FlutterwaveProvider"]
