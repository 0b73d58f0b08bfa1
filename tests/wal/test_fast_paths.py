"""The append hot path's shortcuts write exactly the bytes of the plain code they stand for.

* :func:`canonical_body` formats outcome bodies (``{at, amount, balance, credit_note_id}`` and
  ``{at}``) without the generic JSON encoder: same bytes, same errors, for any values.
* :func:`frame_batch` frames a batch in one pass: ``b"".join(encode(lsn, item) ...)``.
* :meth:`Partition.lookup_many` answers like :meth:`Partition.lookup` per id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum, StrEnum
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import InvalidRecord
from worker.limits import MAX_SAFE_INTEGER
from worker.wal import Partition, RecordType, canonical_body
from worker.wal import record as record_module
from worker.wal.record import encode, frame_batch, prepare
from worker.wal.segment import parse_records

OUTCOME_KEYS = ("at", "amount", "balance", "credit_note_id")


class Code(StrEnum):
    A = 'a"b'


class Small(IntEnum):
    ONE = 1


@contextmanager
def _generic_only() -> Iterator[None]:
    """canonical_body as it was before the known-shape shortcut: the generic encoder only."""
    with mock.patch.dict(record_module._KNOWN_SHAPES, clear=True):
        yield


def _outcome(body: dict[str, Any]) -> bytes | str:
    """canonical_body's bytes, or its error message."""
    try:
        return canonical_body(body)
    except InvalidRecord as error:
        return f"InvalidRecord: {error}"


# Every kind of text the escaping must agree on: quotes, backslashes, control characters,
# non-ASCII, U+2028, lone surrogates (refused), and ``%``/``{`` that a format string could mangle.
texts = st.text(alphabet=st.characters(blacklist_categories=()), max_size=30) | st.sampled_from(
    ["", '"', "\\", "\x00\x1f\x7f", "\b\f\n\r\t", "é€😀", "\u2028\u2029", "\ud800", "%s{}{0}%%", "cn-000000000042"]
)
values = st.one_of(
    texts,
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.sampled_from([Code.A, Small.ONE]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.permutations(OUTCOME_KEYS),
    st.fixed_dictionaries({key: values for key in OUTCOME_KEYS}),
)
def test_outcome_shape_is_byte_identical_to_the_generic_encoder(order: list[str], by_key: dict[str, Any]) -> None:
    body = {key: by_key[key] for key in order}  # any insertion order
    fast = _outcome(body)
    with _generic_only():
        assert fast == _outcome(body)


@settings(max_examples=1500, deadline=None)
@given(
    st.fixed_dictionaries(
        {"at": st.integers(min_value=0, max_value=2**63), "amount": texts, "balance": texts, "credit_note_id": texts}
    )
)
def test_outcome_shape_matches_the_documented_canonical_form(body: dict[str, Any]) -> None:
    """The common case, against the format's definition (json.dumps, sorted keys, no spaces)."""
    try:
        expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(InvalidRecord):
            canonical_body(body)
    else:
        assert canonical_body(body) == expected


@settings(max_examples=500, deadline=None)
@given(values)
def test_at_only_shape_is_byte_identical_to_the_generic_encoder(at: Any) -> None:
    fast = _outcome({"at": at})
    with _generic_only():
        assert fast == _outcome({"at": at})


@pytest.mark.parametrize(
    "body",
    [
        {"at": 10**5000, "amount": "1", "balance": "2", "credit_note_id": "n"},  # int too long to print
        {"at": 10**5000},
        {"at": 1, "amount": "1", "balance": "2", "credit_note_id": "n", "extra": "x"},  # another shape
        {"at": 1, "amount": "1", "balance": "2", "note": "n"},  # four keys, other names
        {"at": 1, "amount": "1", "balance": None, "credit_note_id": "n"},  # balance unknown
        {1: "x"},
        {"at": True},
    ],
)
def test_known_shape_edges_match_the_generic_encoder(body: dict[Any, Any]) -> None:
    fast = _outcome(body)
    with _generic_only():
        assert fast == _outcome(body)


def test_the_pipeline_outcome_body_takes_the_known_shape() -> None:
    """The shortcut is used for what replay writes (a body built as ``Pipeline._settle`` does)."""
    body = {"at": 1714564800123, "credit_note_id": "cn-1", "amount": "250000", "balance": "9000000"}
    with mock.patch.object(record_module, "_encode_json", side_effect=AssertionError("generic encoder used")):
        expected = b'{"amount":"250000","at":1714564800123,"balance":"9000000","credit_note_id":"cn-1"}'
        assert canonical_body(body) == expected
        assert canonical_body({"at": 5}) == b'{"at":5}'


items = st.tuples(
    st.sampled_from(list(RecordType)),
    st.integers(min_value=0, max_value=MAX_SAFE_INTEGER),
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=10), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=2**62), st.lists(items, min_size=1, max_size=20))
def test_frame_batch_is_the_concatenation_of_encode(first_lsn: int, raw_items: list[Any]) -> None:
    prepared = [prepare(*item) for item in raw_items]
    data, records = frame_batch(first_lsn, prepared)
    assert data == b"".join(encode(first_lsn + i, item) for i, item in enumerate(prepared))
    parsed: list[Any] = []
    _pos, next_lsn, detail, _torn, _need = parse_records(data, 0, first_lsn, lambda r, _o: parsed.append(r), final=True)
    assert detail is None and next_lsn == first_lsn + len(prepared)
    assert parsed == records
    assert [(r.lsn, r.type, r.fencing_token, r.entry_id, r.raw_body) for r in records] == [
        (first_lsn + i, p.type, p.fencing_token, p.entry_id, p.raw_body) for i, p in enumerate(prepared)
    ]


def test_lookup_many_answers_like_lookup(part: Partition) -> None:
    part.append_batch([(RecordType.ENTRY, 1, f"e{i}", {"i": str(i)}) for i in range(4)])
    part.append(RecordType.APPLIED, 1, "e1", {"at": 1})
    ids = ["e0", "e1", "missing", "e3", "e1"]
    assert part.lookup_many(ids) == [part.lookup(entry_id) for entry_id in ids]
    assert part.lookup_many([]) == []
