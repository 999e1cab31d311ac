"""PAdES signatures on receipts and credit notes, with pyHanko, in the render process.

With RECEIPT_SIGNING_KEY and RECEIPT_SIGNING_CERT (PEM text, or paths to PEM files) every
document is signed as it is rendered (PAdES baseline B-B: the signing certificate inside the
signature). Without them documents are unsigned, and /admin/health says so.

The signature carries the signing time, so two renders of one document signed at different
times differ in bytes; the hash chain records the first, and a re-render (a lost file) is
entered as a new version.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """The key and certificate (chain) as PEM bytes; handed to the render processes."""

    key_pem: bytes
    cert_pem: bytes

    def __repr__(self) -> str:  # never print the key
        return "SigningMaterial(key_pem=<secret>, cert_pem=...)"


def pem_from_setting(value: str) -> bytes:
    """A setting holds the PEM itself or the path of a file holding it."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return (text + "\n").encode()
    return Path(text).read_bytes()


def signing_material(key: str | None, cert: str | None) -> SigningMaterial | None:
    if not key or not cert:
        return None
    material = SigningMaterial(key_pem=pem_from_setting(key), cert_pem=pem_from_setting(cert))
    _signer(material)  # refuse a key or certificate that cannot be used, at start-up
    return material


@lru_cache(maxsize=2)
def _signer(material: SigningMaterial) -> Any:
    from pyhanko.keys import load_certs_from_pemder_data, load_private_key_from_pemder_data
    from pyhanko.sign import signers
    from pyhanko_certvalidator.registry import SimpleCertificateStore

    key = load_private_key_from_pemder_data(material.key_pem, passphrase=None)
    certs = list(load_certs_from_pemder_data(material.cert_pem))
    if not certs:
        raise ValueError("RECEIPT_SIGNING_CERT holds no certificate")
    return signers.SimpleSigner(
        signing_cert=certs[0],
        signing_key=key,
        cert_registry=SimpleCertificateStore.from_certs(certs),  # type: ignore[no-untyped-call]
    )


def sign_pdf(pdf: bytes, material: SigningMaterial, *, reason: str) -> bytes:
    """``pdf`` with a PAdES signature over all of it (an incremental update)."""
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers

    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    metadata = signers.PdfSignatureMetadata(
        field_name="Signature",
        reason=reason or None,
        subfilter=fields.SigSeedSubFilter.PADES,
    )
    signed = signers.sign_pdf(writer, metadata, signer=_signer(material))
    return bytes(signed.getvalue())
