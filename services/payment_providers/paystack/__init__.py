"""Paystack: Transactions (initialize, then the customer pays on Paystack's checkout page,
verify), Refunds and signed webhooks, over the REST API with the shared async HTTP client.
``provider`` makes the calls; ``transformers`` converts between Paystack's JSON and our types.
"""

from .provider import PaystackProvider

__all__ = ["PaystackProvider"]
