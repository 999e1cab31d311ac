"""Request dependencies behind typed aliases; tests swap them with dependency_overrides."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import AuthenticationRequired, InvalidToken, PermissionDenied
from app.security import User, decode_access_token
from app.settings import Settings
from services.payment_service import PaymentService
from services.payment_store import PaymentStore

# Every dependency here is `async def`: FastAPI runs a plain `def` dependency in a worker
# thread, which cost more than the whole Redis round trip of a request (seen in a profile).

_bearer = HTTPBearer(auto_error=False, description="JWT from `payments token`")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> PaymentService:
    service: PaymentService = request.app.state.service
    return service


async def get_store(request: Request) -> PaymentStore:
    store: PaymentStore = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(get_settings)]
PaymentServiceDep = Annotated[PaymentService, Depends(get_service)]
StoreDep = Annotated[PaymentStore, Depends(get_store)]


async def get_optional_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User | None:
    """The caller, when a token is sent. A token that is sent but bad is a 401, never
    silently anonymous."""
    if credentials is None:
        if request.headers.get("authorization"):
            raise InvalidToken("The Authorization header must be 'Bearer <token>'")
        return None
    settings: Settings = request.app.state.settings
    return decode_access_token(settings, credentials.credentials)


OptionalUser = Annotated[User | None, Depends(get_optional_user)]


async def get_current_user(user: OptionalUser) -> User:
    if user is None:
        raise AuthenticationRequired("This endpoint needs a bearer token")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise PermissionDenied("This endpoint is for administrators")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def client_address(request: Request) -> str:
    # Behind a proxy, run uvicorn with --proxy-headers so that this is the real client.
    return request.client.host if request.client else "unknown"
