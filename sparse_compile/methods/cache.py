"""Typed per-site cache entries: each stored with the key it depends on, never returned stale."""

from __future__ import annotations

from typing import Any, Hashable, TypeVar

Entry = TypeVar("Entry")


class SiteCache:
    """What one model caches at one attention site between calls.

    At most one entry per (entry type, CFG branch) is kept, with the key it was computed for
    (the grid, shapes, dtype, device and method config it depends on): :meth:`get` returns it only
    for an equal key, and :meth:`put` replaces it. So the cache never holds more entries than
    entry types times branches, whatever resolutions pass through the site.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[type, int], tuple[Hashable, Any]] = {}

    def get(self, kind: type[Entry], branch: int, key: Hashable) -> Entry | None:
        """The ``kind`` entry of ``branch`` computed for ``key``, or ``None``."""
        slot = self._slots.get((kind, branch))
        if slot is None or slot[0] != key:
            return None
        return slot[1]

    def put(self, branch: int, key: Hashable, entry: object) -> None:
        """Store ``entry`` (replacing the one of its type and ``branch``) as computed for ``key``."""
        self._slots[(type(entry), branch)] = (key, entry)

    def entries(self) -> dict[tuple[type, int], Any]:
        """``{(entry type, branch): entry}`` of everything held."""
        return {slot: value for slot, (_, value) in self._slots.items()}

    def clear(self) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)
