"""The words on receipts and credit notes, per RECEIPT_LOCALE (amounts and dates are
formatted for the same locale with babel, in services/receipt_document.py)."""

from __future__ import annotations

from collections.abc import Mapping

EN: Mapping[str, str] = {
    "receipt": "Receipt",
    "payment_confirmation": "Payment confirmation",
    "credit_note": "Credit note",
    "number": "No.",
    "date": "Date",
    "seller": "Seller",
    "buyer": "Buyer",
    "vat_id": "VAT ID",
    "description": "Description",
    "quantity": "Qty",
    "unit_price": "Unit price",
    "amount": "Amount",
    "plan": "Plan",
    "service_period": "Service period",
    "partial_capture": "Captured {captured} of {authorized} authorized",
    "net": "Net",
    "total": "Total",
    "total_paid": "Total paid",
    "paid": "Paid",
    "payment": "Payment",
    "payment_method": "Payment method",
    "card_ending": "ending in",
    "via": "via",
    "provider_reference": "Provider reference",
    "payment_id": "Payment ID",
    "no_tax": "No {tax} charged.",
    "reverse_charge": (
        "Reverse charge: no {tax} charged; the buyer accounts for it "
        "(Article 196, Council Directive 2006/112/EC)."
    ),
    "tax_line": "{tax} {rate} %",
    "merchant_of_record": (
        "Sold by {mor} as merchant of record, who issues the tax receipt for this purchase. "
        "This confirmation from {seller} is not a tax receipt."
    ),
    "corrects": "Corrects receipt",
    "refunded": "Refunded",
    "refund_reference": "Refund ID",
    "test_mark": "TEST",
    "test_note": "Test payment: no real money moved. Not valid as a receipt.",
    "thanks": "Thank you for your purchase. Keep this receipt for your records.",
    "thanks_confirmation": "Thank you for your purchase.",
    "credit_note_footer": "This credit note corrects the receipt named above.",
    "sandbox": "Sandbox test payment",
    "card": "Card",
}

DE: Mapping[str, str] = {
    "receipt": "Rechnung",
    "payment_confirmation": "Zahlungsbestätigung",
    "credit_note": "Gutschrift",
    "number": "Nr.",
    "date": "Datum",
    "seller": "Verkäufer",
    "buyer": "Käufer",
    "vat_id": "USt-IdNr.",
    "description": "Beschreibung",
    "quantity": "Menge",
    "unit_price": "Einzelpreis",
    "amount": "Betrag",
    "plan": "Tarif",
    "service_period": "Leistungszeitraum",
    "partial_capture": "Eingezogen {captured} von {authorized} autorisiert",
    "net": "Netto",
    "total": "Gesamt",
    "total_paid": "Bezahlt gesamt",
    "paid": "Bezahlt",
    "payment": "Zahlung",
    "payment_method": "Zahlungsart",
    "card_ending": "endend auf",
    "via": "über",
    "provider_reference": "Referenz des Zahlungsdienstes",
    "payment_id": "Zahlungs-ID",
    "no_tax": "Es wird keine {tax} berechnet.",
    "reverse_charge": (
        "Steuerschuldnerschaft des Leistungsempfängers (Reverse Charge): keine {tax} "
        "berechnet (Art. 196 MwSt-Systemrichtlinie)."
    ),
    "tax_line": "{tax} {rate} %",
    "merchant_of_record": (
        "Verkauft von {mor} als Händler (Merchant of Record), der die Rechnung für diesen "
        "Kauf ausstellt. Diese Bestätigung von {seller} ist keine Rechnung."
    ),
    "corrects": "Korrigiert Rechnung",
    "refunded": "Erstattet",
    "refund_reference": "Erstattungs-ID",
    "test_mark": "TEST",
    "test_note": "Testzahlung: Es wurde kein echtes Geld bewegt. Keine gültige Rechnung.",
    "thanks": "Vielen Dank für Ihren Kauf. Bitte bewahren Sie diese Rechnung auf.",
    "thanks_confirmation": "Vielen Dank für Ihren Kauf.",
    "credit_note_footer": "Diese Gutschrift korrigiert die oben genannte Rechnung.",
    "sandbox": "Sandbox-Testzahlung",
    "card": "Karte",
}

TEXTS: Mapping[str, Mapping[str, str]] = {"en": EN, "de": DE}
