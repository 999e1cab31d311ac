"""LemonSqueezy, a merchant of record: checkouts for a plan's variant at our catalogue price,
orders linked by the ``order_created`` webhook, order refunds, HMAC-signed webhooks, over its
JSON:API REST API with the shared async HTTP client. ``provider`` makes the calls;
``transformers`` converts between LemonSqueezy's documents and our types.
"""

from .provider import LemonSqueezyProvider

__all__ = ["LemonSqueezyProvider"]
