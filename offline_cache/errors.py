"""Exceptions of the offline cache: one small hierarchy, caught only at its boundaries."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error the offline cache raises on purpose."""


class SchemaError(CacheError):
    """The database file is not one this software can use (newer, foreign, or damaged)."""


class CacheClosed(CacheError):
    """An operation reached the cache after it was closed."""


class UnknownReservation(CacheError):
    """A commit or abort named a reservation that is not held (already settled or expired)."""


class RecordError(CacheError):
    """One ticket, product, block or zone record is invalid; the message names the field only."""


class SiteKeyError(CacheError):
    """The site key file is missing, too short, or readable by someone other than its owner."""
