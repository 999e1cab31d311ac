"""Authorize.Net's hosted form, as our redirect page sees it: the form's address and the
token to post to it. It finds the provider among those configured now (a hot swap replaces
them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from services.errors import OperationNotSupported

from .provider import AuthorizeNetProvider, HostedForm

if TYPE_CHECKING:
    from ..factory import PaymentProviderFactory


class AuthorizeNetHostedPage:
    def __init__(self, providers: Callable[[], PaymentProviderFactory]) -> None:
        self._providers = providers

    async def form(self, payment_id: str) -> HostedForm:
        """The form to post for ``payment_id``; PaymentNotFound, or InvalidStateTransition
        once it has been used or has lapsed."""
        provider = self._providers().get_configured(AuthorizeNetProvider.name)
        if not isinstance(provider, AuthorizeNetProvider):
            raise OperationNotSupported("The authorizenet provider is not the built-in one")
        return await provider.hosted_form(payment_id)
