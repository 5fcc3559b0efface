"""A least-recently-used map bounded by count and by bytes: the worker's blob and shared-memory caches."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LruCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most `max_count` entries and `max_bytes` bytes (as `size` counts them), oldest evicted first,
    except that the newest `keep` entries always stay. Not locked: its owner holds a lock around it."""

    def __init__(self, max_count: int, max_bytes: int, size: Callable[[V], int], *, keep: int = 1) -> None:
        self.max_count = max(1, max_count)
        self.max_bytes = max_bytes
        self.keep = keep
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._sizes: dict[K, int] = {}
        """Bytes counted for each entry (`size` when put, or what `resize` said since)."""
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        return list(self._entries.values())

    def items(self) -> list[tuple[K, V]]:
        return list(self._entries.items())

    def get(self, key: K) -> V | None:
        """The value under `key` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[V]:
        """Store `value` as the newest entry (replacing one under `key`); return what was evicted."""
        evicted = [old] if (old := self.pop(key)) is not None else []
        self._entries[key] = value
        self._sizes[key] = self._size(value)
        self._bytes += self._sizes[key]
        return evicted + self._evict()

    def resize(self, key: K, value: V, nbytes: int) -> list[V]:
        """Count `nbytes` for `key` from now on if it still holds `value` (which grew, e.g. a cache of its
        own), evicting the oldest entries beyond the bounds; return what was evicted."""
        if self._entries.get(key) is not value:
            return []
        self._bytes += nbytes - self._sizes[key]
        self._sizes[key] = nbytes
        return self._evict()

    def _evict(self) -> list[V]:
        evicted = []
        while len(self._entries) > self.keep and (
            len(self._entries) > self.max_count or self._bytes > self.max_bytes
        ):
            key, oldest = self._entries.popitem(last=False)
            self._bytes -= self._sizes.pop(key)
            evicted.append(oldest)
        return evicted

    def pop(self, key: K) -> V | None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._bytes -= self._sizes.pop(key)
        return value

    def pop_where(self, predicate: Callable[[V], bool]) -> list[V]:
        """Remove and return every value for which `predicate` holds."""
        keys = [key for key, value in self._entries.items() if predicate(value)]
        return [value for key in keys if (value := self.pop(key)) is not None]

    def clear(self) -> list[V]:
        """Empty the cache; return what it held."""
        values, self._entries, self._bytes = list(self._entries.values()), OrderedDict(), 0
        self._sizes.clear()
        return values
