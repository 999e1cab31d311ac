"""PayPal: Orders v2 (create, approve on PayPal's page, capture), Payments v2 refunds and
Webhooks v1 signature verification, over the REST API with the shared async HTTP client.
``provider`` makes the calls; ``transformers`` converts between PayPal's JSON and our types.
"""

from .provider import PayPalProvider

__all__ = ["PayPalProvider"]
