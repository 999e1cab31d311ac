"""Who is calling: the identity a verified bearer token names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class User:
    sub: str
    role: str | None = None
    email: str | None = None  # the token's ``email`` claim, when it has a usable one

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
