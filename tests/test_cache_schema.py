"""The cache's file: created at schema version 1, reopened with its data, guarded against
files it must not touch, and ready for a version 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from offline_cache import Cache, SchemaError, read_events
from offline_cache import schema as schema_module
from offline_cache.schema import SCHEMA_VERSION, connect, migrate, user_version


def test_fresh_file_has_the_full_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gate.db"
    with Cache(path):
        pass
    db = sqlite_utils.Database(path)
    assert user_version(db) == SCHEMA_VERSION == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {"products", "tickets", "usage", "blocks", "zones", "sync_state", "outbox", "nonces"}
    assert tables <= set(db.table_names())
    db.close()


def test_reopening_keeps_the_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        cache.apply_delta(0, 1, [{"id": "P", "zones": ["park"]}], kind="products").result()
        cache.append("hello", "L1", n=1)
    with Cache(path) as cache:
        assert cache.versions()["products"] == 1
        assert cache.stats()["products"] == 1
        cache.append("again", None)
    assert [e.kind for e in read_events(path)] == ["hello", "again"]
    assert [e.seq for e in read_events(path)] == [1, 2]


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        Cache(path)


def test_a_foreign_file_with_a_user_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE events (seq INTEGER PRIMARY KEY); PRAGMA user_version = 1;")
    conn.close()
    with pytest.raises(SchemaError, match="not a gate-agent cache"):
        Cache(path)


def test_a_further_migration_runs_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        cache.append("before", None)

    def extra(db: sqlite_utils.Database) -> None:
        db.execute("ALTER TABLE zones ADD COLUMN note TEXT")

    current = schema_module.SCHEMA_VERSION
    monkeypatch.setattr(schema_module, "MIGRATIONS", (*schema_module.MIGRATIONS, extra))
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", current + 1)
    db = connect(path, writer=True)
    assert migrate(db) == current
    assert user_version(db) == current + 1
    assert "note" in db["zones"].columns_dict
    assert migrate(db) == current + 1
    db.close()
    assert [e.kind for e in read_events(path)] == ["before"]


def test_a_failing_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gate.db"
    with Cache(path):
        pass

    def broken(db: sqlite_utils.Database) -> None:
        db.execute("ALTER TABLE zones ADD COLUMN half TEXT")
        raise RuntimeError("power cut")

    current = schema_module.SCHEMA_VERSION
    monkeypatch.setattr(schema_module, "MIGRATIONS", (*schema_module.MIGRATIONS, broken))
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", current + 1)
    db = connect(path, writer=True)
    with pytest.raises(RuntimeError):
        migrate(db)
    assert user_version(db) == current
    assert "half" not in db["zones"].columns_dict
    db.close()


def test_a_version_1_file_gains_the_nonce_table_and_keeps_its_data(tmp_path: Path) -> None:
    from offline_cache.schema import MIGRATIONS

    path = tmp_path / "gate.db"
    db = connect(path, writer=True)
    db.execute("PRAGMA journal_mode = WAL")
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO sync_state (key, value) VALUES ('tickets_version', 7)")
    db.close()
    with Cache(path) as cache:
        assert cache.versions()["tickets"] == 7
        now = 1_800_000_000.0
        assert cache.remember_nonce("n-1", now + 60, now).result()
        assert not cache.remember_nonce("n-1", now + 60, now).result()
        # Expired nonces are forgotten: the message they belonged to is refused as expired.
        assert cache.remember_nonce("n-1", now + 200, now + 120).result()
