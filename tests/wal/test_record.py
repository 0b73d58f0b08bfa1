"""Record framing, validation and the resync search."""

from __future__ import annotations

import struct
from enum import StrEnum

import pytest
from crc32c import crc32c

from worker.errors import InvalidRecord
from worker.limits import MAX_SAFE_INTEGER
from worker.wal import Record, RecordType, canonical_body
from worker.wal.record import HEADER, HEADER_SIZE, encode, prepare
from worker.wal.segment import find_valid_record, parse_records


def _decode_all(data: bytes, first_lsn: int = 1) -> tuple[list[Record], int, str | None]:
    out: list[Record] = []
    pos, next_lsn, detail, _torn, _need = parse_records(data, 0, first_lsn, lambda r, _o: out.append(r), final=True)
    assert pos <= len(data)
    return out, next_lsn, detail


def test_encode_decode_round_trip() -> None:
    items = [
        prepare(RecordType.ENTRY, 0, "e-1", {"b": "2", "a": [1, None, True]}),
        prepare(RecordType.APPLIED, MAX_SAFE_INTEGER, "e-1", {"note": "é"}),
        prepare(RecordType.REJECTED, 3, "", {"raw": {"x": "y"}, "reason": "entry_id: missing"}),
    ]
    data = b"".join(encode(lsn, item) for lsn, item in enumerate(items, start=5))
    records, next_lsn, detail = _decode_all(data, 5)
    assert detail is None and next_lsn == 8
    assert [(r.lsn, r.type, r.fencing_token, r.entry_id) for r in records] == [
        (5, RecordType.ENTRY, 0, "e-1"),
        (6, RecordType.APPLIED, MAX_SAFE_INTEGER, "e-1"),
        (7, RecordType.REJECTED, 3, ""),
    ]
    assert records[0].body == {"a": [1, None, True], "b": "2"}
    assert records[0].raw_body == b'{"a":[1,null,true],"b":"2"}'
    assert records[1].body == {"note": "é"}


def test_header_layout_and_crc_covers_length() -> None:
    data = encode(1, prepare(RecordType.ENTRY, 9, "id", {}))
    crc, length, lsn, token, code, eid_len = HEADER.unpack_from(data)
    assert (length, lsn, token, code, eid_len) == (4, 1, 9, 1, 2)
    assert len(data) == HEADER_SIZE + length
    assert crc == crc32c(data[4:])
    # A length that still fits the buffer but is wrong fails the CRC instead of being believed.
    forged = data[:4] + struct.pack("<I", 3) + data[8:]
    _records, _lsn, detail = _decode_all(forged)
    assert detail is not None


def test_body_is_canonical_and_record_body_is_a_copy() -> None:
    assert canonical_body({"b": 1, "a": {"d": "x", "c": None}}) == b'{"a":{"c":null,"d":"x"},"b":1}'
    record = Record(1, RecordType.ENTRY, 0, "e", b'{"a":"1"}')
    record.body["a"] = "changed"
    assert record.body == {"a": "1"}


class Status(StrEnum):
    OK = "ok"


def test_str_subclasses_encode_as_values() -> None:
    assert canonical_body({"status": Status.OK}) == b'{"status":"ok"}'


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 1.5},
        {"nested": [{"x": 0.0}]},
        {"nan": float("nan")},
        {1: "int key"},
        {"bytes": b"x"},
        {"set": {1}},
        {"surrogate": "\ud800"},
    ],
)
def test_bad_bodies_refused(body: dict[object, object]) -> None:
    with pytest.raises(InvalidRecord):
        prepare(RecordType.ENTRY, 0, "e", body)  # type: ignore[arg-type]


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRecord, match="JSON object"):
        prepare(RecordType.ENTRY, 0, "e", ["a"])  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [-1, MAX_SAFE_INTEGER + 1, True, 1.0, "1"])
def test_bad_tokens_refused(token: object) -> None:
    with pytest.raises(InvalidRecord, match="fencing token"):
        prepare(RecordType.ENTRY, token, "e", {})  # type: ignore[arg-type]


def test_entry_id_rules() -> None:
    with pytest.raises(InvalidRecord, match="non-empty"):
        prepare(RecordType.ENTRY, 0, "", {})
    assert prepare(RecordType.REJECTED, 0, "", {}).entry_id == ""
    with pytest.raises(InvalidRecord, match="bytes"):
        prepare(RecordType.ENTRY, 0, "x" * 1025, {})
    with pytest.raises(InvalidRecord):
        prepare(RecordType.ENTRY, 0, 42, {})  # type: ignore[arg-type]


def test_unknown_type_refused() -> None:
    with pytest.raises(InvalidRecord, match="record type"):
        prepare(99, 0, "e", {})
    assert prepare(1, 0, "e", {}).type is RecordType.ENTRY


def test_payload_size_bounded() -> None:
    with pytest.raises(InvalidRecord, match="payload"):
        prepare(RecordType.REJECTED, 0, "e", {"raw": "x" * (8 * 1024 * 1024)})


def test_valid_crc_but_wrong_lsn_is_not_a_torn_candidate() -> None:
    data = encode(7, prepare(RecordType.ENTRY, 0, "e", {}))
    pos, next_lsn, detail, torn, _need = parse_records(data, 0, 1, None, final=True)
    assert (pos, next_lsn, torn) == (0, 1, False)
    assert detail is not None and "LSN 7" in detail


def test_find_valid_record_skips_zeros_and_garbage() -> None:
    good = encode(42, prepare(RecordType.ENTRY, 1, "e", {"k": "v"}))
    junk = b"\x00" * 5000 + bytes(range(256)) * 4
    assert find_valid_record(junk + good, 0, 40) == (len(junk), 42)
    assert find_valid_record(junk, 0, 40) is None
    # An LSN below the minimum is not evidence of anything.
    assert find_valid_record(junk + good, 0, 43) is None
    # Large LSNs (upper bytes non-zero) are found too.
    big = encode(5 << 40, prepare(RecordType.ENTRY, 1, "e", {}))
    assert find_valid_record(junk + big, 0, (5 << 40) - 3) == (len(junk), 5 << 40)
