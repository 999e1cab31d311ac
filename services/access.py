"""Who may see a payment: the rules every service that reads one for a caller applies."""

from __future__ import annotations

from models.payment import PaymentRecord
from models.user import User
from services.errors import PaymentNotFound


def seen_by(record: PaymentRecord | None, payment_id: str, user: User | None) -> PaymentRecord:
    """``record`` if ``user`` may see it (its owner, an admin, anyone for an anonymous
    payment reached by its ID). To anyone else it does not exist."""
    if record is None or not _may_see(record, user):
        raise PaymentNotFound(f"No payment {payment_id!r}")
    return record


def owned_by(record: PaymentRecord | None, payment_id: str, user: User) -> PaymentRecord:
    """``record`` if ``user`` owns it or is an admin; to anyone else it does not exist (an
    anonymous payment is an admin's only)."""
    if record is None or not (user.is_admin or record.owner == user.sub):
        raise PaymentNotFound(f"No payment {payment_id!r}")
    return record


def _may_see(record: PaymentRecord, user: User | None) -> bool:
    if record.owner is None:
        return True  # an anonymous payment is reached by its ID
    return user is not None and (user.is_admin or user.sub == record.owner)
