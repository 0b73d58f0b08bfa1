"""WAL records: types, the in-memory :class:`Record`, and the binary framing.

Frame layout (all integers little-endian, sizes in bytes)::

    offset  size  field
    0       4     crc32c      CRC32C (Castagnoli) of bytes [4, 28 + payload_len)
    4       4     payload_len len(entry_id) + len(body), 2 .. MAX_PAYLOAD_BYTES
    8       8     lsn         dense per-partition log sequence number, >= 1
    16      8     token       fencing token, 0 .. 2**53 - 1 (0 = written while failing open)
    24      2     type        RecordType code (1 .. 65535; 0 is never valid)
    26      2     entry_id_len  UTF-8 bytes of entry_id, <= payload_len - 2
    28      n     entry_id    UTF-8
    28 + n  m     body        canonical JSON object: json.dumps(sort_keys=True, separators=(",", ":"))

The CRC covers everything after it, including the length, so a record is accepted only when the
length it claims is also the length that was written. A length is used only to find the range to
check, and only after bounding it by :data:`MAX_PAYLOAD_BYTES` and by the bytes actually present;
a record that fails its CRC is never skipped over by its length (see :mod:`worker.wal.segment`).

Bodies never hold floats: amounts travel as decimal strings. :func:`prepare` enforces it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from enum import Enum, IntEnum
from typing import Any, NamedTuple

from crc32c import crc32c

from worker.errors import InvalidRecord
from worker.limits import MAX_SAFE_INTEGER

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_ENTRY_ID_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MIN_PAYLOAD_BYTES",
    "MIN_RECORD_BYTES",
    "OUTCOME_TYPES",
    "TYPE_BY_CODE",
    "Classification",
    "EntryState",
    "Prepared",
    "Record",
    "RecordType",
    "canonical_body",
    "encode",
    "frame_batch",
    "prepare",
]


class RecordType(IntEnum):
    """What a record says. Codes are stored on disk: never renumber, only add (up to 65535)."""

    #: A billing entry was accepted (body: the canonical entry). Opens ``entry_id``.
    ENTRY = 1
    #: Outcome: the credit note was applied (closes the ENTRY with the same entry_id).
    APPLIED = 2
    #: Outcome: actual >= quoted, nothing to credit (closes the ENTRY).
    NO_CREDIT = 3
    #: Outcome: the cap refused the credit note; terminal (closes the ENTRY).
    CAP_EXCEEDED = 4
    #: A rejected entry (raw payload and reason). Stands alone: never indexed, never pending.
    REJECTED = 5
    #: Credit consumed by ``apply_credit``; ``entry_id`` holds the request_id (own index).
    CREDIT_USED = 6


#: Record types that close an ENTRY with the same entry_id.
OUTCOME_TYPES: frozenset[RecordType] = frozenset({RecordType.APPLIED, RecordType.NO_CREDIT, RecordType.CAP_EXCEEDED})
#: Decoding table: on-disk code -> RecordType (a dict lookup is much cheaper than ``RecordType(n)``).
TYPE_BY_CODE: dict[int, RecordType] = {t.value: t for t in RecordType}

#: crc32c, payload_len, lsn, token, type, entry_id_len.
HEADER = struct.Struct("<IIQQHH")
HEADER_SIZE = HEADER.size  # 28
_REST = struct.Struct("<IQQHH")  # the header without its CRC: what the CRC starts with
_CRC = struct.Struct("<I")

#: Largest payload (entry_id + body) accepted on write and believed on read: 8 MiB.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
#: Largest entry_id, UTF-8 bytes.
MAX_ENTRY_ID_BYTES = 1024
#: Smallest payload: an empty entry_id (REJECTED only) and the body ``{}``.
MIN_PAYLOAD_BYTES = 2
MIN_RECORD_BYTES = HEADER_SIZE + MIN_PAYLOAD_BYTES


class Record(NamedTuple):
    """One decoded record. Immutable; ``body`` decodes ``raw_body`` afresh on every access."""

    lsn: int
    type: RecordType
    fencing_token: int
    entry_id: str
    #: The body exactly as stored: canonical JSON bytes.
    raw_body: bytes

    @property
    def body(self) -> dict[str, Any]:
        """The body as a new dict (mutating it never changes the record)."""
        value: dict[str, Any] = json.loads(self.raw_body)
        return value

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view for the CLI and tests."""
        return {
            "lsn": self.lsn,
            "type": self.type.name,
            "fencing_token": self.fencing_token,
            "entry_id": self.entry_id,
            "body": self.body,
        }


class EntryState(NamedTuple):
    """Idempotency-index value: an ENTRY record and the outcome record that closed it (or None)."""

    entry: Record
    outcome: Record | None

    @property
    def pending(self) -> bool:
        """True while no outcome has been recorded."""
        return self.outcome is None


class Classification(Enum):
    """:meth:`worker.wal.Partition.classify` verdicts."""

    #: No ENTRY with this entry_id.
    NEW = "new"
    #: An ENTRY with this entry_id and byte-identical canonical body exists.
    DUPLICATE = "duplicate"
    #: An ENTRY with this entry_id exists with a different body.
    CONFLICT = "conflict"


class Prepared(NamedTuple):
    """A validated record waiting for its LSN (see :func:`prepare`)."""

    type: RecordType
    fencing_token: int
    entry_id: str
    entry_id_bytes: bytes
    raw_body: bytes


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _make_fast_encode() -> Callable[[dict[str, Any]], str]:
    """The C encoder behind ``_ENCODER``, built once (``json.dumps`` builds one per call, which
    costs more than the encoding of a small body). Falls back to ``_ENCODER.encode``."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        chunks = make(
            None,  # no cycle check: _check_json has walked the value already
            _ENCODER.default,
            json.encoder.encode_basestring,
            None,
            ":",
            ",",
            True,
            False,
            False,
        )
    except TypeError:  # a different signature in some other Python version
        return _ENCODER.encode

    def encode_fast(body: dict[str, Any]) -> str:
        return "".join(chunks(body, 0))

    if encode_fast({"b": [1, None, True], "a": "\u00e9"}) != _ENCODER.encode({"b": [1, None, True], "a": "\u00e9"}):
        return _ENCODER.encode
    return encode_fast


_encode_json = _make_fast_encode()
_SCALARS = frozenset({str, int, bool, type(None)})
_STR_ONLY = frozenset({str})
#: The JSON string literal of a str, exactly as the encoder above writes one (ensure_ascii=False).
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def _outcome_json(body: dict[str, Any]) -> str | None:
    """The canonical JSON of an outcome body ``{at: int, amount, balance, credit_note_id: str}``
    (what replay appends for nearly every entry), or None when a value has another type.

    The generic encoder sorts and walks the dict in C but still costs about 0.3 µs per key; this
    f-string of the four values in sorted-key order is byte-identical (keys are plain ASCII,
    strings go through the encoder's own escaping, an exact int prints as ``repr``) and about
    2.5 times cheaper. ``tests/wal/test_fast_paths.py`` compares the two over generated bodies.
    """
    at, amount, balance, note = body["at"], body["amount"], body["balance"], body["credit_note_id"]
    if type(at) is not int or type(amount) is not str or type(balance) is not str or type(note) is not str:
        return None
    text = _json_string
    return f'{{"amount":{text(amount)},"at":{at},"balance":{text(balance)},"credit_note_id":{text(note)}}}'


def _at_only_json(body: dict[str, Any]) -> str | None:
    """The canonical JSON of ``{"at": int}`` (a NO_CREDIT outcome), or None for another type."""
    at = body["at"]
    return f'{{"at":{at}}}' if type(at) is int else None


#: Bodies of a known shape and their fast encoders, by key count (see :func:`_outcome_json`).
#: Only an exact key-set match uses one; anything else takes the generic encoder.
_KNOWN_SHAPES: dict[int, tuple[frozenset[str], Callable[[dict[str, Any]], str | None]]] = {
    4: (frozenset({"at", "amount", "balance", "credit_note_id"}), _outcome_json),
    1: (frozenset({"at"}), _at_only_json),
}


def _check_json(value: object, where: str) -> None:
    """Raise InvalidRecord unless ``value`` holds only dict(str keys)/list/str/int/bool/None."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, str | int):
        return  # str and int subclasses (StrEnum, IntEnum) encode as their values
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRecord(f"body{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, float):
        raise InvalidRecord(f"body{where}: floats are not allowed (send amounts as strings)")
    raise InvalidRecord(f"body{where}: {kind.__name__} is not a JSON value")


def canonical_body(body: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of ``body`` (sorted keys, no spaces, UTF-8, no floats/NaN).

    Raises :class:`InvalidRecord` when ``body`` is not a JSON object of str/int/bool/None/list/dict.
    """
    if type(body) is not dict:
        if not isinstance(body, Mapping):
            raise InvalidRecord(f"body must be a JSON object, not {type(body).__name__}")
        body = dict(body)
    try:
        known = _KNOWN_SHAPES.get(len(body))
        if known is not None and body.keys() == known[0]:
            text = known[1](body)
            if text is not None:
                return text.encode("utf-8")
        # Fast path (C-level loops): a flat object of str keys and scalar values. Anything else
        # (nested values, subclasses, bad types) is walked by _check_json, which raises on error.
        if not (_STR_ONLY.issuperset(map(type, body)) and _SCALARS.issuperset(map(type, body.values()))):
            _check_json(body, "")
        return _encode_json(body).encode("utf-8")
    except RecursionError:
        raise InvalidRecord("body: nested too deeply (or contains itself)") from None
    except (TypeError, ValueError) as error:  # e.g. lone surrogates
        if isinstance(error, InvalidRecord):
            raise
        raise InvalidRecord(f"body: {error}") from None


def prepare(record_type: RecordType | int, fencing_token: int, entry_id: str, body: Mapping[str, Any]) -> Prepared:
    """Validate one record to append; raise :class:`InvalidRecord` (a ValueError) when malformed.

    * ``record_type``: a :class:`RecordType` (or its code);
    * ``fencing_token``: int in ``[0, 2**53 - 1]`` (bool refused);
    * ``entry_id``: str of 1..1024 UTF-8 bytes (REJECTED may have an empty one);
    * ``body``: JSON object without floats; entry_id + body at most :data:`MAX_PAYLOAD_BYTES`.
    """
    rtype = TYPE_BY_CODE.get(record_type) if type(record_type) is not RecordType else record_type
    if rtype is None or type(record_type) is bool:
        raise InvalidRecord(f"unknown record type {record_type!r}")
    if type(fencing_token) is not int or not 0 <= fencing_token <= MAX_SAFE_INTEGER:
        raise InvalidRecord(f"fencing token must be an int in [0, 2**53-1], got {fencing_token!r}")
    if type(entry_id) is not str:
        raise InvalidRecord(f"entry_id must be a str, got {type(entry_id).__name__}")
    try:
        eid = entry_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord("entry_id is not valid UTF-8 text") from None
    if len(eid) > MAX_ENTRY_ID_BYTES:
        raise InvalidRecord(f"entry_id is {len(eid)} bytes (max {MAX_ENTRY_ID_BYTES})")
    if not eid and rtype is not RecordType.REJECTED:
        raise InvalidRecord(f"{rtype.name} record needs a non-empty entry_id")
    raw = canonical_body(body)
    if len(eid) + len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidRecord(f"record payload {len(eid) + len(raw)} bytes (max {MAX_PAYLOAD_BYTES})")
    return tuple.__new__(Prepared, (rtype, fencing_token, entry_id, eid, raw))


def encode(lsn: int, prepared: Prepared) -> bytes:
    """Frame ``prepared`` as record ``lsn`` (see the module docstring for the layout)."""
    eid = prepared.entry_id_bytes
    raw = prepared.raw_body
    rest = _REST.pack(len(eid) + len(raw), lsn, prepared.fencing_token, prepared.type, len(eid))
    crc = crc32c(raw, crc32c(eid, crc32c(rest)))
    return b"".join((_CRC.pack(crc), rest, eid, raw))


def frame_batch(first_lsn: int, prepared: Iterable[Prepared]) -> tuple[bytes, list[Record]]:
    """Frame ``prepared`` as records ``first_lsn``, ``first_lsn + 1``, ...: the bytes to write,
    exactly ``b"".join(encode(lsn, item) ...)``, and the :class:`Record` each frame holds.

    The append hot path (every appended record passes here once), hence :func:`encode` unrolled
    over the batch: one join for the whole buffer instead of one per frame, each
    :class:`Prepared` unpacked once instead of read field by field, the Records built in the same
    pass, lookups hoisted. The CRC is taken over the header-after-CRC, entry_id and body joined
    (one ``crc32c`` call instead of three chained ones): the same bytes, so the same value.
    """
    parts: list[bytes] = []
    records: list[Record] = []
    add_part, add_record = parts.append, records.append
    pack_rest, pack_crc, new = _REST.pack, _CRC.pack, tuple.__new__
    lsn = first_lsn
    for rtype, token, entry_id, eid, raw in prepared:
        covered = pack_rest(len(eid) + len(raw), lsn, token, rtype, len(eid)) + eid + raw
        add_part(pack_crc(crc32c(covered)))
        add_part(covered)
        add_record(new(Record, (lsn, rtype, token, entry_id, raw)))
        lsn += 1
    return b"".join(parts), records
