"""The fine-tuning API's lasting state: files, jobs, events and checkpoints in one SQLite
database (standard library, WAL mode) under `--finetune-dir`.

Rows are plain dicts with OpenAI's field names where there is one; JSON columns (metadata,
hyperparameters, error, result_files, data, metrics) are decoded on read. One connection is
shared by the event loop and the engine thread behind a lock (every call is short: a few rows).
Lists come newest first, as OpenAI's do, paged by `after` (the id of the last row of the
previous page) and `limit`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
    filename TEXT NOT NULL, bytes INTEGER NOT NULL, purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL, examples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, hyperparameters TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT, trained_tokens INTEGER,
    created_at INTEGER NOT NULL, finished_at INTEGER, estimated_finish INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]', adapter_path TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    type TEXT NOT NULL, data TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
"""
JSON_COLUMNS = ("metadata", "hyperparameters", "error", "result_files", "data", "metrics")
JOB_FIELDS = frozenset({
    "status", "error", "fine_tuned_model", "trained_tokens", "finished_at", "estimated_finish",
    "result_files", "adapter_path", "hyperparameters",
})  # fmt: skip


def _row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    out = {}
    for (name, *_), value in zip(cursor.description, row, strict=True):
        if name in JSON_COLUMNS and value is not None:
            value = json.loads(value)
        out[name] = value
    out.pop("seq", None)
    return out


class FinetuneDB:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = _row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _insert(self, table: str, row: dict) -> dict:
        cols = list(row)
        values = tuple(json.dumps(row[c]) if c in JSON_COLUMNS and row[c] is not None
                       else row[c] for c in cols)  # fmt: skip
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self._lock:
            self._db.execute(sql, values)
        return row

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int):
        """(rows newest first, has_more); `after` = an id of this listing, else from the top.
        An unknown `after` gives an empty page."""
        if after is not None:
            where += f" AND seq < COALESCE((SELECT seq FROM {table} WHERE id = ?), -1)"
            args = (*args, after)
        rows = self._all(
            f"SELECT * FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
        )
        return rows[:limit], len(rows) > limit

    # -- files -------------------------------------------------------------------------------

    def add_file(self, row: dict) -> dict:
        return self._insert("files", row)

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def list_files(self, tenant: str | None, after: str | None = None, limit: int = 10000):
        where, args = ("tenant = ?", (tenant,)) if tenant is not None else ("1", ())
        return self._page("files", where, args, after, limit)

    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def jobs_using_file(self, file_id: str, statuses: tuple[str, ...]) -> list[str]:
        marks = ", ".join("?" * len(statuses))
        rows = self._all(
            f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) "
            f"AND status IN ({marks})",
            (file_id, file_id, *statuses),
        )
        return [r["id"] for r in rows]

    # -- jobs --------------------------------------------------------------------------------

    def add_job(self, row: dict) -> dict:
        return self._insert("jobs", row)

    def get_job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(self, tenant: str | None, after: str | None = None, limit: int = 20):
        where, args = ("tenant = ?", (tenant,)) if tenant is not None else ("1", ())
        return self._page("jobs", where, args, after, limit)

    def jobs_with_status(self, statuses: tuple[str, ...]) -> list[dict]:
        marks = ", ".join("?" * len(statuses))
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)

    def count_jobs(self, tenant: str, statuses: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(statuses))
        row = self._one(
            f"SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status IN ({marks})",
            (tenant, *statuses),
        )
        return row["n"]

    def update_job(self, job_id: str, **fields) -> None:
        bad = set(fields) - JOB_FIELDS
        if bad:
            raise ValueError(f"not updatable job fields: {sorted(bad)}")
        cols = list(fields)
        values = [json.dumps(fields[c]) if c in JSON_COLUMNS and fields[c] is not None
                  else fields[c] for c in cols]  # fmt: skip
        sql = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?"
        with self._lock:
            self._db.execute(sql, (*values, job_id))

    def job_counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def trained_tokens_by_tenant(self) -> dict[str, int]:
        rows = self._all(
            "SELECT tenant, SUM(COALESCE(trained_tokens, 0)) AS n FROM jobs GROUP BY tenant"
        )
        return {r["tenant"]: r["n"] for r in rows}

    # -- events and checkpoints ----------------------------------------------------------------

    def add_event(self, row: dict) -> dict:
        row.setdefault("created_at", int(time.time()))
        return self._insert("events", row)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20):
        return self._page("events", "job_id = ?", (job_id,), after, limit)

    def add_checkpoint(self, row: dict) -> dict:
        return self._insert("checkpoints", row)

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10):
        return self._page("checkpoints", "job_id = ?", (job_id,), after, limit)

    def all_checkpoints(self, job_id: str) -> list[dict]:
        return self._all("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq", (job_id,))
