"""JWT bearer tokens (python-jose). The token's ``sub`` owns payments; ``role: admin`` may
read everything and refund."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from jose import JWTError, jwt

from app.errors import InvalidToken
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class User:
    sub: str
    role: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def create_access_token(
    settings: Settings, sub: str, *, admin: bool = False, expires_minutes: int | None = None
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
    return str(
        jwt.encode(
            claims, settings.jwt_secret_key.get_secret_value(), algorithm=settings.jwt_algorithm
        )
    )


def decode_access_token(settings: Settings, token: str) -> User:
    """The token's user. Expired, forged, unsigned (``alg: none``) or malformed: InvalidToken."""
    if len(token) > 4096:
        raise InvalidToken("Token too long")
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
    sub = claims.get("sub")
    role = claims.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise InvalidToken("The bearer token has no usable subject")
    return User(sub=sub, role=role if isinstance(role, str) else None)
