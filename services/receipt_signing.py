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
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
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


@lru_cache(maxsize=1)
def _pyhanko_sign() -> ModuleType:
    """``pyhanko.sign``, imported once. pyHanko 0.38 imports cryptography's DSA key type at
    import time (for type checks of keys it is handed), and cryptography 51 warns on any use
    of DSA. We never sign with DSA: that one warning is silenced here, for this import only,
    so that a start-up does not print it (and a test run, where warnings are errors, passes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DSA is deprecated", module="pyhanko")
        import pyhanko.sign

    return pyhanko.sign


@lru_cache(maxsize=2)
def _signer(material: SigningMaterial) -> Any:
    signers = _pyhanko_sign().signers
    from pyhanko.keys import load_certs_from_pemder_data, load_private_key_from_pemder_data
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
    sign = _pyhanko_sign()
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

    fields, signers = sign.fields, sign.signers
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    metadata = signers.PdfSignatureMetadata(
        field_name="Signature",
        reason=reason or None,
        subfilter=fields.SigSeedSubFilter.PADES,
    )
    signed = signers.sign_pdf(writer, metadata, signer=_signer(material))
    return bytes(signed.getvalue())
