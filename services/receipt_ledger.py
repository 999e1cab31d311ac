"""The receipt ledger in Redis: gapless document numbers and an append-only hash chain.

Receipts (series ``R``) and credit notes (series ``CN``) are numbered per series and year by
one counter each (``R-2026-000123``). A document's number is allocated once, atomically with
the counter, and kept under the document's id (a payment id, a refund id) for ever: retries,
other workers and re-renders all read the same number back. Allocation is the only way a
counter moves, and it always records the number it handed out, so the sequence has no gaps.

Every rendered document is entered in one append-only chain: its number, the SHA-256 of its
PDF bytes, its version (1 for the first render; a re-render whose bytes differ is a new
version, never an overwrite) and the previous entry's hash. The entry's own hash is SHA-256
over those fields and is computed inside the script that appends it, so that two workers
appending at once can never fork the chain. ``verify`` walks the chain and the stored PDFs.

All ledger keys share one hash tag: on a Redis Cluster each script touches one slot. The
number and the chain live apart from the payment's keys (``pay:{id}``), in another slot, so
they are never written in the payment's own transition script. A number allocated here is
then kept on the payment (or refund) by the payment store (services/payment_receipts.py does
both when a payment becomes paid), so that a render reads it with the payment and needs the
ledger once, after rendering, for the chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from services.errors import ReceiptLedgerInconsistent
from services.payment_store import RedisClient, store_errors

log = logging.getLogger("payments.receipts")

GENESIS = "0" * 64


class Series(StrEnum):
    RECEIPT = "R"
    CREDIT_NOTE = "CN"


# SHA-256 (FIPS 180-4) in Redis's Lua 5.1 with its LuaBitOp module: Redis offers only
# redis.sha1hex, and the chain's links must be as strong as the PDF hashes they join. Checked
# against hashlib by the tests (and by every `payments receipts verify`).
_SHA256_LUA = """
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local ror, rshift, tobit, tohex = bit.ror, bit.rshift, bit.tobit, bit.tohex
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
local function sha256hex(message)
  local length = #message
  local padded = message .. '\\128' .. string.rep('\\0', (55 - length) % 64)
  local bits = length * 8
  local tail = {}
  for i = 8, 1, -1 do
    tail[i] = string.char(bits % 256)
    bits = math.floor(bits / 256)
  end
  padded = padded .. table.concat(tail)
  local h = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  }
  for i = 1, #h do h[i] = tobit(h[i]) end
  local w = {}
  for chunk = 1, #padded, 64 do
    for t = 0, 15 do
      local a, b, c, d = string.byte(padded, chunk + t * 4, chunk + t * 4 + 3)
      w[t] = tobit(a * 16777216 + b * 65536 + c * 256 + d)
    end
    for t = 16, 63 do
      local s0 = bxor(ror(w[t - 15], 7), ror(w[t - 15], 18), rshift(w[t - 15], 3))
      local s1 = bxor(ror(w[t - 2], 17), ror(w[t - 2], 19), rshift(w[t - 2], 10))
      w[t] = tobit(w[t - 16] + s0 + w[t - 7] + s1)
    end
    local a, b, c, d, e, f, g, hh = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
    for t = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local temp1 = tobit(hh + S1 + ch + K[t + 1] + w[t])
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      local temp2 = tobit(S0 + maj)
      hh, g, f, e, d, c, b, a = g, f, e, tobit(d + temp1), c, b, a, tobit(temp1 + temp2)
    end
    h[1] = tobit(h[1] + a); h[2] = tobit(h[2] + b); h[3] = tobit(h[3] + c)
    h[4] = tobit(h[4] + d); h[5] = tobit(h[5] + e); h[6] = tobit(h[6] + f)
    h[7] = tobit(h[7] + g); h[8] = tobit(h[8] + hh)
  end
  local out = {}
  for i = 1, 8 do out[i] = tohex(h[i]) end
  return table.concat(out)
end
"""

# KEYS: the series' counter for the year, the documents hash (document id -> JSON).
# ARGV: document id, series, year, number format, the document's kind.
# The number a document already has, or the next one, recorded with it in the same script.
_NUMBER_LUA = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then return existing end
local seq = redis.call('INCR', KEYS[1])
local doc = cjson.encode({
  doc_id = ARGV[1], series = ARGV[2], year = tonumber(ARGV[3]), seq = seq,
  format = ARGV[4], kind = ARGV[5], version = 0
})
redis.call('HSET', KEYS[2], ARGV[1], doc)
return doc
"""

# KEYS: the chain (list of entry JSON), the documents hash.
# ARGV: document id, number, SHA-256 of the PDF, when (ISO), kind.
# Appends a version when the bytes differ from the document's last recorded ones; the same
# bytes again (a second worker, a lost file rendered again) change nothing.
_RECORD_LUA = (
    _SHA256_LUA
    + """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'unnumbered', ''} end
local doc = cjson.decode(raw)
if doc['sha256'] == ARGV[3] then return {'unchanged', raw} end
local index = redis.call('LLEN', KEYS[1])
local previous = '"""
    + GENESIS
    + """'
if index > 0 then previous = cjson.decode(redis.call('LINDEX', KEYS[1], -1))['hash'] end
local version = (doc['version'] or 0) + 1
local line = table.concat(
  {index, ARGV[5], ARGV[2], ARGV[1], version, ARGV[3], ARGV[4], previous}, '|'
)
local hash = sha256hex(line)
redis.call('RPUSH', KEYS[1], cjson.encode({
  index = index, kind = ARGV[5], number = ARGV[2], doc_id = ARGV[1], version = version,
  pdf_sha256 = ARGV[3], at = ARGV[4], prev = previous, hash = hash
}))
doc['version'] = version
doc['sha256'] = ARGV[3]
doc['index'] = index
local encoded = cjson.encode(doc)
redis.call('HSET', KEYS[2], ARGV[1], encoded)
return {'appended', encoded}
"""
)


@dataclass(frozen=True, slots=True)
class LedgerDocument:
    """What the ledger holds about one document: its number, and once rendered, the hash of
    its current PDF and which version that is."""

    doc_id: str
    kind: str  # receipt | credit_note
    number: str
    version: int = 0  # 0: numbered, not rendered yet
    sha256: str | None = None

    @classmethod
    def from_json(cls, raw: str) -> LedgerDocument:
        data = json.loads(raw)
        return cls(
            doc_id=str(data["doc_id"]),
            kind=str(data["kind"]),
            number=format_number(str(data["format"]), int(data["year"]), int(data["seq"])),
            version=int(data.get("version") or 0),
            sha256=str(data["sha256"]) if data.get("sha256") else None,
        )


@dataclass(frozen=True, slots=True)
class ChainEntry:
    index: int
    kind: str
    number: str
    doc_id: str
    version: int
    pdf_sha256: str
    at: str
    prev: str
    hash: str

    def expected_hash(self) -> str:
        """The entry's hash as the append script computes it."""
        line = "|".join(
            str(part)
            for part in (
                self.index,
                self.kind,
                self.number,
                self.doc_id,
                self.version,
                self.pdf_sha256,
                self.at,
                self.prev,
            )
        )
        return hashlib.sha256(line.encode()).hexdigest()


def format_number(template: str, year: int, seq: int) -> str:
    """``R-{year}-{seq:06d}`` -> ``R-2026-000123``."""
    return template.format(year=year, seq=seq)


def check_number_format(template: str) -> str:
    """A number format must name the sequence (or numbers would repeat) and nothing else."""
    if "{seq" not in template:
        raise ValueError("a document number format must contain {seq}, e.g. R-{year}-{seq:06d}")
    try:
        format_number(template, 2026, 1)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"a document number format may use only {{year}} and {{seq}}: {error}"
        ) from error
    return template


class ReceiptLedger:
    """Numbers and the hash chain, for one merchant (the service's key prefix)."""

    def __init__(self, redis: RedisClient, *, prefix: str = "") -> None:
        self._redis = redis
        base = f"{prefix}ledger:{{receipts}}"
        self._docs = f"{base}:docs"
        self._chain = f"{base}:chain"
        self._counter = f"{base}:seq"
        self._number = redis.register_script(_NUMBER_LUA)
        self._record = redis.register_script(_RECORD_LUA)

    async def number(
        self, doc_id: str, *, series: Series, year: int, template: str, kind: str
    ) -> LedgerDocument:
        """The document's number: the one it has, or the next of ``series`` in ``year``."""
        async with store_errors():
            raw = await self._number(
                keys=[f"{self._counter}:{series}:{year}", self._docs],
                args=[doc_id, str(series), year, template, kind],
            )
        return LedgerDocument.from_json(str(raw))

    async def document(self, doc_id: str) -> LedgerDocument | None:
        async with store_errors():
            raw = await self._redis.hget(self._docs, doc_id)
        return LedgerDocument.from_json(str(raw)) if raw else None

    async def documents(self, doc_ids: list[str]) -> list[LedgerDocument | None]:
        if not doc_ids:
            return []
        async with store_errors():
            raws = cast(list[str | None], await self._redis.hmget(self._docs, doc_ids))
        return [LedgerDocument.from_json(raw) if raw else None for raw in raws]

    async def record(
        self, document: LedgerDocument, pdf_sha256: str, *, at: datetime
    ) -> LedgerDocument:
        """Enter the document's PDF in the chain (a new version when its bytes changed)."""
        async with store_errors():
            outcome, raw = await self._record(
                keys=[self._chain, self._docs],
                args=[document.doc_id, document.number, pdf_sha256, at.isoformat(), document.kind],
            )
        if outcome == "unnumbered":
            log.error(
                "receipt.ledger_entry_missing",
                extra={"doc_id": document.doc_id, "number": document.number},
            )
            raise ReceiptLedgerInconsistent(
                f"{document.number} is not in the receipt ledger; run `payments receipts verify`"
            )
        return LedgerDocument.from_json(str(raw))

    async def chain(self, *, batch: int = 1000) -> list[ChainEntry]:
        entries: list[ChainEntry] = []
        start = 0
        while True:
            async with store_errors():
                raws = cast(
                    list[str], await self._redis.lrange(self._chain, start, start + batch - 1)
                )
            entries.extend(ChainEntry(**_entry_fields(json.loads(raw))) for raw in raws)
            if len(raws) < batch:
                return entries
            start += batch

    async def all_documents(self) -> dict[str, LedgerDocument]:
        async with store_errors():
            raw = cast(dict[str, str], await self._redis.hgetall(self._docs))
        return {doc_id: LedgerDocument.from_json(value) for doc_id, value in raw.items()}


def _entry_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": int(data["index"]),
        "kind": str(data["kind"]),
        "number": str(data["number"]),
        "doc_id": str(data["doc_id"]),
        "version": int(data["version"]),
        "pdf_sha256": str(data["pdf_sha256"]),
        "at": str(data["at"]),
        "prev": str(data["prev"]),
        "hash": str(data["hash"]),
    }


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What ``verify`` found: how much it checked, and the first entry that does not match
    (None when everything does)."""

    entries: int
    documents: int
    mismatch: str | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None


async def verify(ledger: ReceiptLedger, read_pdf: Callable[[str], bytes | None]) -> ChainReport:
    """Walk the chain from its first entry: each must link to the one before and hash to
    what it says; then each document's newest version must be the PDF stored for it
    (``read_pdf(doc_id)``: its bytes, None when missing). Names the first mismatch."""
    entries = await ledger.chain()
    previous = GENESIS
    newest: dict[str, ChainEntry] = {}
    for position, entry in enumerate(entries):
        where = f"entry {position} ({entry.number} v{entry.version})"
        if entry.index != position:
            return ChainReport(position, len(newest), f"{where}: index says {entry.index}")
        if entry.prev != previous:
            return ChainReport(position, len(newest), f"{where}: does not link to entry before")
        if entry.expected_hash() != entry.hash:
            return ChainReport(position, len(newest), f"{where}: its hash does not match")
        before = newest.get(entry.doc_id)
        if entry.version != (before.version + 1 if before else 1):
            return ChainReport(position, len(newest), f"{where}: version out of sequence")
        newest[entry.doc_id] = entry
        previous = entry.hash
    documents = await ledger.all_documents()
    for doc_id, entry in newest.items():
        where = f"entry {entry.index} ({entry.number} v{entry.version})"
        held = documents.get(doc_id)
        if held is None or held.sha256 != entry.pdf_sha256 or held.number != entry.number:
            return ChainReport(len(entries), len(newest), f"{where}: the ledger's record differs")
        data = read_pdf(doc_id)
        if data is None:
            return ChainReport(len(entries), len(newest), f"{where}: the stored PDF is missing")
        if hashlib.sha256(data).hexdigest() != entry.pdf_sha256:
            return ChainReport(
                len(entries), len(newest), f"{where}: the stored PDF does not match its hash"
            )
    return ChainReport(len(entries), len(newest))
