"""The compact id table: a set with stable entry numbers, checked against dict and set."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from bulkoffboard.idtable import KEY_WIDTH, IdTable

keys = st.binary(min_size=KEY_WIDTH, max_size=KEY_WIDTH)


@settings(max_examples=200)
@given(st.lists(st.one_of(keys, st.sampled_from([b"\x00" * KEY_WIDTH, b"\xff" * KEY_WIDTH]))))
def test_it_behaves_as_an_insertion_ordered_dict_of_entry_numbers(added: list[bytes]) -> None:
    table = IdTable()
    model: dict[bytes, int] = {}
    for key in added:
        entry = table.add(key)
        assert entry == model.setdefault(key, len(model))
    assert len(table) == len(model)
    assert list(table) == list(model)
    for key, entry in model.items():
        assert table.find(key) == entry
        assert table.key_at(entry) == key
        assert key in table


@given(st.lists(keys, unique=True, min_size=1, max_size=50), keys)
def test_absent_keys_and_other_widths_are_not_found(present: list[bytes], other: bytes) -> None:
    table = IdTable(reserve=len(present))
    for key in present:
        table.add(key)
    if other not in present:
        assert table.find(other) == -1
        assert other not in table
    assert table.find(present[0][:-1]) == -1, "a prefix of a key is not the key"
    assert table.find(present[0] + b"\x00") == -1
    assert "not bytes" not in table


def test_it_grows_past_its_reserve_and_keeps_every_entry() -> None:
    table = IdTable(reserve=4)
    added = [n.to_bytes(KEY_WIDTH, "big") for n in range(5000)]  # shared prefixes on purpose
    for key in added:
        table.add(key)
    assert [table.find(key) for key in added] == list(range(5000))


def test_a_key_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="must be 20 bytes"):
        IdTable().add(b"short")
