"""Sessions of the admin dashboard: an admin's bearer token, pasted once, exchanged for a
session cookie.

A session is a random ID in an HttpOnly cookie and a record in Redis under the ID's digest,
with an expiry. Chosen over a signed cookie (itsdangerous) because signing out, or an
operator deleting the record, ends the session at once on every worker; a signed cookie
stays valid until it expires, wherever it was copied to. The digest as the key means a copy
of Redis holds no cookie that could be replayed.

A session never outlives the token it was made from, nor ``ADMIN_SESSION_TTL_SECONDS``. Its
record carries the CSRF token that every form of the dashboard sends back (compared in
constant time), so a page of another site can post nothing in the admin's name, on top of
the cookie's SameSite=Strict.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from jose import jwt

from models.user import User
from services.errors import AuthenticationRequired, PermissionDenied
from services.payment_store import RedisClient, store_errors

SESSION_ID_BYTES = 32
# A token no longer than this is read; the API reads no longer ones either.
MAX_TOKEN_CHARS = 4096


class SessionMissing(AuthenticationRequired):
    """No session, an expired one, or one signed out: sign in again."""

    code = "admin_session_required"
    title = "Sign in to the dashboard"


class CsrfRefused(PermissionDenied):
    code = "csrf_token_invalid"
    title = "The form is stale or was not sent by the dashboard"


@dataclass(frozen=True, slots=True)
class AdminSession:
    session_id: str  # the cookie's value; never stored
    user: User
    csrf_token: str
    expires_at: float

    def check_csrf(self, sent: str | None) -> None:
        """Refuse a form whose CSRF token is not this session's."""
        check_same_token(self.csrf_token, sent)


def check_same_token(expected: str, sent: str | None) -> None:
    if not sent or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise CsrfRefused("Reload the page and send the form again")


def new_token() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


class AdminSessions:
    """``verify_token`` is the app's bearer-token check (the user a token names, or
    ``InvalidToken``); ``public_base_url`` the service's public address, whose origin forms may
    come from besides the request's own."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str,
        ttl_s: int,
        verify_token: Callable[[str], User],
        public_base_url: str | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        self._verify_token = verify_token
        public = urlsplit(public_base_url or "")
        self._public_origin = f"{public.scheme}://{public.netloc}" if public.netloc else None

    def check_origin(self, origin: str | None, own_origin: str) -> None:
        """A browser names the page a form came from in Origin: it must be ours (the
        request's own, or the public base URL's). SameSite=Strict and the CSRF token already
        refuse other sites; this refuses them before the body is read."""
        if origin is None:
            return
        if origin not in {own_origin, self._public_origin}:
            raise CsrfRefused("The form was sent from another site")

    def _key(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self._prefix}admin-session:{{{digest}}}"

    async def sign_in(self, token: str) -> AdminSession:
        """A new session for an admin's bearer token. A bad or expired token is
        ``InvalidToken`` (401); a user's token that is not an admin's, ``PermissionDenied``."""
        token = token.strip().removeprefix("Bearer ").strip()
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationRequired("Paste an admin bearer token")
        user = self._verify_token(token)
        if not user.is_admin:
            raise PermissionDenied("This token is not an administrator's")
        # The signature was checked just above: its expiry is now safe to read.
        token_expires = float(jwt.get_unverified_claims(token)["exp"])
        expires_at = min(time.time() + self._ttl_s, token_expires)
        ttl_ms = int((expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            raise AuthenticationRequired("The token has expired")
        session = AdminSession(new_token(), user, new_token(), expires_at)
        key = self._key(session.session_id)
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "sub": user.sub,
                    "role": user.role or "",
                    "csrf": session.csrf_token,
                    "expires_at": repr(expires_at),
                },
            )
            pipe.pexpire(key, ttl_ms)
            await pipe.execute()
        return session

    async def get(self, session_id: str | None) -> AdminSession:
        """The live session for the cookie's value, else ``SessionMissing``."""
        if not session_id or len(session_id) > 128:
            raise SessionMissing("Sign in to the dashboard")
        async with store_errors():
            fields = cast(dict[str, str], await self._redis.hgetall(self._key(session_id)))
        if not fields or "csrf" not in fields:
            raise SessionMissing("Your session has ended: sign in again")
        expires_at = float(fields["expires_at"])
        if expires_at <= time.time():  # Redis expires it too; this holds between its sweeps
            raise SessionMissing("Your session has ended: sign in again")
        user = User(sub=fields["sub"], role=fields["role"] or None)
        if not user.is_admin:
            raise SessionMissing("Sign in to the dashboard")
        return AdminSession(session_id, user, fields["csrf"], expires_at)

    async def sign_out(self, session_id: str) -> None:
        async with store_errors():
            await self._redis.delete(self._key(session_id))
