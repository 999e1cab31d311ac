"""Vipps MobilePay: the ePayment API (reserve in the app, capture, cancel, refund) and the
Webhooks API's HMAC-signed events, over the shared async HTTP client. ``provider`` makes the
calls; ``transformers`` converts between the API's JSON and our types.
"""

from .provider import MobilePayProvider

__all__ = ["MobilePayProvider"]
