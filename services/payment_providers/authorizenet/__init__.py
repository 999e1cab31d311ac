"""Authorize.Net: Accept Hosted (a card form on Authorize.Net's site, reached through a page
of ours that posts its token), capture, void and refund through createTransaction, the
Transaction Reporting calls to read transactions, and signed webhooks, over the JSON API with
the shared async HTTP client. ``provider`` makes the calls; ``transformers`` converts between
Authorize.Net's JSON and our types; ``hosted_page`` is what our redirect page asks for.
"""

from .provider import AuthorizeNetProvider

__all__ = ["AuthorizeNetProvider"]
