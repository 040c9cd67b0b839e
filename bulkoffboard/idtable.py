"""A compact, insertion-ordered set of fixed-width binary keys (machine ids as 20 raw bytes).

A million machine ids in a ``set[bytes]`` take about 120 MB (a 53-byte object and a set slot
each); here they take about 28 MB: the keys side by side in one ``bytearray`` and an
open-addressing index of 4-byte entry numbers. Callers keep per-key values in parallel arrays
indexed by the entry number, which is stable (entries are only ever appended).

The slot of a key is taken from Python's own (randomised) ``hash`` of it, so ids chosen to
collide cannot slow the table down.
"""

from __future__ import annotations

import array
from collections.abc import Iterator

#: Width of a key in bytes: a machine id is 40 hex digits.
KEY_WIDTH = 20
_EMPTY = -1


class IdTable:
    """Fixed-width keys, each with a stable entry number (0, 1, ... in insertion order)."""

    __slots__ = ("_index", "_keys", "_mask", "_size", "width")

    def __init__(self, reserve: int = 0, *, width: int = KEY_WIDTH) -> None:
        self.width = width
        self._keys = bytearray()
        self._size = 0
        capacity = 8
        while capacity * 2 < reserve * 3:  # load factor at most 2/3
            capacity *= 2
        self._index = array.array("i", [_EMPTY]) * capacity
        self._mask = capacity - 1

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.find(key) != _EMPTY

    def __iter__(self) -> Iterator[bytes]:
        width, keys = self.width, self._keys
        for start in range(0, self._size * width, width):
            yield bytes(keys[start : start + width])

    def key_at(self, entry: int) -> bytes:
        """The key of entry number ``entry``."""
        start = entry * self.width
        return bytes(self._keys[start : start + self.width])

    def find(self, key: bytes) -> int:
        """The entry number of ``key``, or -1."""
        width, keys, index, mask = self.width, self._keys, self._index, self._mask
        if len(key) != width:
            return _EMPTY
        slot = hash(key) & mask
        while True:
            entry = index[slot]
            if entry == _EMPTY or keys.startswith(key, entry * width):
                return entry
            slot = (slot + 1) & mask

    def add(self, key: bytes) -> int:
        """The entry number of ``key``, added at the end when new: then it is ``len - 1``.

        Raises ValueError for a key of the wrong width.
        """
        width = self.width
        if len(key) != width:
            raise ValueError(f"a key must be {width} bytes, not {len(key)}")
        keys, index, mask = self._keys, self._index, self._mask
        slot = hash(key) & mask
        while True:
            entry = index[slot]
            if entry == _EMPTY:
                break
            if keys.startswith(key, entry * width):
                return entry
            slot = (slot + 1) & mask
        entry = self._size
        index[slot] = entry
        keys += key
        self._size = entry + 1
        if self._size * 3 > (mask + 1) * 2:
            self._grow()
        return entry

    def _grow(self) -> None:
        capacity = (self._mask + 1) * 2
        mask = capacity - 1
        index = array.array("i", [_EMPTY]) * capacity
        keys, width = self._keys, self.width
        for entry in range(self._size):
            start = entry * width
            slot = hash(bytes(keys[start : start + width])) & mask
            while index[slot] != _EMPTY:
                slot = (slot + 1) & mask
            index[slot] = entry
        self._index, self._mask = index, mask
