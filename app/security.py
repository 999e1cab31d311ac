"""JWT bearer tokens (python-jose). The token's ``sub`` owns payments; ``role: admin`` may
read everything and refund."""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

from jose import JWTError, jwt

from app.settings import Settings
from models.user import User
from services.errors import InvalidToken


def create_access_token(
    settings: Settings,
    sub: str,
    *,
    admin: bool = False,
    expires_minutes: int | None = None,
    email: str | None = None,
) -> str:
    now = datetime.now(UTC)
    minutes = expires_minutes or settings.jwt_access_token_expire_minutes
    claims: dict[str, object] = {
        "sub": sub,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=minutes)).timestamp()),
    }
    if admin:
        claims["role"] = "admin"
    if email:
        claims["email"] = email
    return str(
        jwt.encode(
            claims, settings.jwt_secret_key.get_secret_value(), algorithm=settings.jwt_algorithm
        )
    )


# Tokens already verified, with their expiry: a client sends the same token with every
# request, and checking its signature again each time was a tenth of create-intent's CPU.
# The key is the whole token under the secret it was checked with, so a changed secret, or a
# token differing in any byte (its signature included), is verified afresh.
_VERIFIED_MAX = 4096
_verified: OrderedDict[tuple[str, str, str], tuple[User, float]] = OrderedDict()


def decode_access_token(settings: Settings, token: str) -> User:
    """The token's user. Expired, forged, unsigned (``alg: none``) or malformed: InvalidToken."""
    if len(token) > 4096:
        raise InvalidToken("Token too long")
    cache_key = (settings.jwt_secret_key.get_secret_value(), settings.jwt_algorithm, token)
    hit = _verified.get(cache_key)
    if hit is not None:
        user, expires_at = hit
        if time.time() < expires_at:
            return user
        del _verified[cache_key]
    user, expires_at = _verify(settings, token)
    _verified[cache_key] = (user, expires_at)
    if len(_verified) > _VERIFIED_MAX:
        _verified.popitem(last=False)
    return user


def _verify(settings: Settings, token: str) -> tuple[User, float]:
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret_key.get_secret_value(),
            # Only the configured algorithm: this is what refuses `alg: none` and RS/HS swaps.
            algorithms=[settings.jwt_algorithm],
            options={"require_exp": True, "require_sub": True},
        )
    except JWTError as error:
        raise InvalidToken("The bearer token is invalid or expired") from error
    except RecursionError as error:
        # python-jose reads the token's header with json.loads before it checks the
        # signature, and json.loads recurses once a level: a header of a few thousand "["
        # (within the 4096 characters read) exhausts the stack instead of failing as JSON.
        raise InvalidToken("The bearer token is invalid or expired") from error
    sub = claims.get("sub")
    role = claims.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise InvalidToken("The bearer token has no usable subject")
    email = claims.get("email")
    usable_email = isinstance(email, str) and 3 <= len(email) <= 254 and "@" in email
    return User(
        sub=sub,
        role=role if isinstance(role, str) else None,
        email=email if usable_email else None,
    ), float(claims["exp"])
