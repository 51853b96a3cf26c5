"""The event store of the previous issue, now the cache's outbox: the old names live on here.

``EventStore(path)`` is the cache itself (same ``start``/``append``/``stats``/``close``), so
code written against the event store keeps working while it moves to ``Cache``.
"""

from __future__ import annotations

from offline_cache.cache import Cache
from offline_cache.outbox import StoredEvent, read_events

EventStore = Cache

__all__ = ["EventStore", "StoredEvent", "read_events"]
