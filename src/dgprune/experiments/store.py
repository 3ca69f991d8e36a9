"""The results database of a sweep: SQLite, one row per run, safe under concurrent workers.

Two tables:

- ``units``: one row per pretrained model (id = ``RunConfig.pretrain_id()``). A unit is the job a
  worker claims: pretrain once, then every pruning run of that model. Claiming is one
  ``BEGIN IMMEDIATE`` transaction (pending -> running, with the worker's host, pid and a heartbeat),
  so two workers never hold the same unit.
- ``runs``: one row per model evaluated: the dense model of each unit (``kind='dense'``, criterion
  ``none``, id = the unit's id) and each pruned model (``kind='pruned'``, id = ``RunConfig.run_id()``).
  A row holds the run's config (JSON), its status (pending / running / done / failed + error text),
  every ``ResultRecord`` field, the dense model's accuracies (for pruned rows), latency, per-layer
  widths, times and library versions.

The database runs in WAL mode with a busy timeout, so readers (``dgprune status``) never block the
workers and writers wait for each other instead of failing. SQLite over a network file system is
not safe: keep the database on a local disk (see docs/experiments.md for Ray).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from dgprune.errors import DgpruneError
from dgprune.experiments.records import ResultRecord, legacy_criterion_params

STATUSES = ("pending", "running", "done", "failed")
BUSY_TIMEOUT_MS = 60_000

# ResultRecord fields stored in their own columns (nested values as JSON text).
_RECORD_FIELDS = {f.name: f for f in fields(ResultRecord)}
_RECORD_ADAPTER = TypeAdapter(ResultRecord)  # a row's values checked against the record's types
_RECORD_COLUMNS = list(_RECORD_FIELDS)
_JSON_COLUMNS = {"dense_per_domain_acc", "layer_widths", "config"} | {
    f.name for f in fields(ResultRecord) if "dict" in str(f.type) or "list" in str(f.type)
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT,
    worker TEXT,
    host TEXT,
    pid INTEGER,
    heartbeat REAL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    unit_id TEXT NOT NULL REFERENCES units (unit_id),
    kind TEXT NOT NULL CHECK (kind IN ('dense', 'pruned')),
    position INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT,
    started_at REAL,
    finished_at REAL,
    dataset TEXT,
    target_domain TEXT,
    model TEXT,
    algorithm TEXT,
    finetune_algorithm TEXT,
    criterion TEXT,
    criterion_params TEXT,
    keep_ratio REAL,
    seed INTEGER,
    intra_acc REAL,
    cross_acc REAL,
    per_domain_acc TEXT,
    worst_source_acc REAL,
    dense_intra_acc REAL,
    dense_cross_acc REAL,
    dense_per_domain_acc TEXT,
    filters_total INTEGER,
    filters_kept INTEGER,
    params INTEGER,
    macs INTEGER,
    params_dense INTEGER,
    macs_dense INTEGER,
    latency_ms REAL,
    layer_widths TEXT,
    selected_step INTEGER,
    model_dir TEXT,
    wall_time_s REAL,
    masked_vs_compressed_max_abs_diff REAL,
    variance_term_share REAL,
    versions TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_unit ON runs (unit_id);
CREATE INDEX IF NOT EXISTS units_by_status ON units (status, position);
"""


@dataclass(frozen=True)
class RunSpec:
    """One row to register: a dense model (kind 'dense') or a pruning run (kind 'pruned')."""

    run_id: str
    unit_id: str
    kind: str
    config: dict[str, Any]  # the resolved RunConfig (for a dense row: without its prune section)
    labels: dict[str, Any]  # dataset, target_domain, model, algorithm, ... for queries before it ran


@dataclass(frozen=True)
class RunResult:
    """What a finished run adds to its row: the record plus measurements that are not in it."""

    record: ResultRecord
    latency_ms: float | None = None
    layer_widths: list[list] | None = None  # [conv name, output channels kept, dense] per conv
    dense: ResultRecord | None = None  # the model before pruning (pruned rows only)


@dataclass(frozen=True)
class Claim:
    unit_id: str
    run_ids: list[str]


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under ``pid``; a zombie (killed, not yet reaped) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: a SIGKILLed worker whose parent died stays a zombie until init reaps it
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def worker_gone(
    unit: Mapping[str, Any], now: float, stale_after_s: float, host: str | None = None
) -> Literal["dead", "silent"] | None:
    """Why the worker of a running unit is gone: its process on this host is "dead", or its heartbeat
    is missing or older than ``stale_after_s`` ("silent"); None while it is alive."""
    host = this_host() if host is None else host
    if unit["host"] == host and unit["pid"] is not None and not pid_alive(unit["pid"]):
        return "dead"
    if unit["heartbeat"] is None or now - unit["heartbeat"] > stale_after_s:
        return "silent"
    return None


def _open_problem(err: OSError | sqlite3.Error) -> str:
    text = str(err.strerror if isinstance(err, OSError) and err.strerror else err)
    if "readonly" in text or "read-only" in text.lower() or "unable to open" in text:
        return f"{text} (dgprune writes to it and beside it: give a writable file on a local disk)"
    if "not a database" in text:
        return f"{text} (a damaged or foreign file: move it away)"
    return text


class Store:
    """A connection to the sweep database; one per process or thread (sqlite3 objects are not shared)."""

    def __init__(self, path: Path | str, timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path)
        try:
            self._open(timeout_ms)
        except (OSError, sqlite3.Error) as err:  # read-only, not a database, a directory...: one line
            if getattr(self, "conn", None) is not None:
                self.conn.close()
            raise DgpruneError(f"results database {self.path}: cannot open: {_open_problem(err)}") from None

    def _open(self, timeout_ms: int) -> None:
        if self.path.is_dir():
            raise sqlite3.OperationalError("it is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE) where needed.
        self.conn = sqlite3.connect(self.path, timeout=timeout_ms / 1000, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
        self.conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at each checkpoint
        # One script in one transaction, so concurrent first opens do not see half a schema.
        self.conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
        self._add_missing_columns()
        # The declared type of each column, to check what is read (a hand-edited row may hold anything).
        self._types = {
            table: {r["name"]: r["type"].upper() for r in self.conn.execute(f"PRAGMA table_info({table})")}
            for table in ("units", "runs")
        }

    def _add_missing_columns(self) -> None:
        """A database made by an older dgprune gets a column for each ResultRecord field added since."""
        have = {row["name"] for row in self.conn.execute("PRAGMA table_info(runs)")}
        if set(_RECORD_COLUMNS) - {"run_id"} <= have:
            return
        with self.transaction() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
            for name in _RECORD_COLUMNS:
                if name not in have:
                    db.execute(f'ALTER TABLE runs ADD COLUMN "{name}"')

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so read-then-write is atomic."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- registering a sweep ---------------------------------------------------------------------

    def register(self, units: Iterable[tuple[str, list[RunSpec]]]) -> int:
        """Add units and their runs that are not there yet (existing rows, done or not, are kept).

        Returns how many runs were added. Positions follow the given order, after existing rows.
        """
        added = 0
        with self.transaction() as db:
            unit_pos = db.execute("SELECT COALESCE(MAX(position), -1) FROM units").fetchone()[0]
            run_pos = db.execute("SELECT COALESCE(MAX(position), -1) FROM runs").fetchone()[0]
            for unit_id, specs in units:
                cur = db.execute(
                    "INSERT OR IGNORE INTO units (unit_id, position, status) VALUES (?, ?, 'pending')",
                    (unit_id, unit_pos + 1),
                )
                unit_pos += cur.rowcount
                new_runs = 0
                for spec in specs:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO runs (run_id, unit_id, kind, position, config, status,"
                        " dataset, target_domain, model, algorithm, finetune_algorithm, criterion,"
                        " criterion_params,"
                        " keep_ratio, seed) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            spec.run_id,
                            spec.unit_id,
                            spec.kind,
                            run_pos + 1,
                            json.dumps(spec.config, sort_keys=True),
                            *(
                                _label_column(key, spec.labels.get(key))
                                for key in (
                                    "dataset",
                                    "target_domain",
                                    "model",
                                    "algorithm",
                                    "finetune_algorithm",
                                    "criterion",
                                    "criterion_params",
                                    "keep_ratio",
                                    "seed",
                                )
                            ),
                        ),
                    )
                    run_pos += cur.rowcount
                    new_runs += cur.rowcount
                if new_runs:  # a unit that got new runs (e.g. a criterion added) must run again
                    db.execute(
                        "UPDATE units SET status = 'pending', error = NULL"
                        " WHERE unit_id = ? AND status IN ('done', 'failed')",
                        (unit_id,),
                    )
                added += new_runs
        return added

    # -- claiming work ---------------------------------------------------------------------------

    def reclaim_stale(
        self, stale_after_s: float, now: float | None = None, max_attempts: int | None = None
    ) -> list[str]:
        """Put back to pending every running unit whose worker is gone; returns their ids.

        Gone = its heartbeat is older than ``stale_after_s``, or it ran on this host and its pid no
        longer exists (a SIGKILLed sweep is then resumed at once, without waiting for staleness).
        With ``max_attempts``, a gone unit already claimed that many times is failed instead (with
        why): a unit that kills its worker (e.g. out of memory) must not take down every worker in turn.
        """
        now = time.time() if now is None else now
        host = this_host()
        reclaimed = []
        with self.transaction() as db:
            for row in db.execute(
                "SELECT unit_id, worker, host, pid, heartbeat, attempts FROM units WHERE status = 'running'"
            ).fetchall():
                gone = worker_gone(row, now, stale_after_s, host)
                if gone is None:
                    continue
                dead = gone == "dead"
                if max_attempts is not None and row["attempts"] >= max_attempts:
                    error = (
                        f"worker {row['worker']} (host {row['host']}, pid {row['pid']}) "
                        f"{'died' if dead else 'stopped beating'} while running this unit, after "
                        f"{row['attempts']} attempt(s): not retried in this sweep (run it again to retry)"
                    )
                    for table in ("runs", "units"):
                        db.execute(
                            f"UPDATE {table} SET status = 'failed', error = ?, finished_at = ?"
                            " WHERE unit_id = ? AND status != 'done'",
                            (error, now, row["unit_id"]),
                        )
                    continue
                reclaimed.append(row["unit_id"])
                db.execute(
                    "UPDATE units SET status = 'pending', worker = NULL, pid = NULL WHERE unit_id = ?",
                    (row["unit_id"],),
                )
                db.execute(
                    "UPDATE runs SET status = 'pending' WHERE unit_id = ? AND status = 'running'",
                    (row["unit_id"],),
                )
        return reclaimed

    def count_units(self, status: str, only: Iterable[str] | None = None) -> int:
        """How many units (of ``only``, if given) have this status."""
        ids = None if only is None else set(only)
        rows = self.conn.execute("SELECT unit_id FROM units WHERE status = ?", (status,)).fetchall()
        return sum(ids is None or r["unit_id"] in ids for r in rows)

    def requeue(self, run_ids: Iterable[str]) -> int:
        """Done runs become pending again (e.g. their model directory was deleted), and so do their
        units; returns how many runs were requeued. A unit another worker holds is left alone."""
        count = 0
        with self.transaction() as db:
            for run_id in run_ids:
                row = db.execute(
                    "SELECT runs.unit_id FROM runs JOIN units ON units.unit_id = runs.unit_id"
                    " WHERE run_id = ? AND runs.status = 'done' AND units.status != 'running'",
                    (run_id,),
                ).fetchone()
                if row is None:
                    continue
                db.execute("UPDATE runs SET status = 'pending', error = NULL WHERE run_id = ?", (run_id,))
                db.execute(
                    "UPDATE units SET status = 'pending', error = NULL"
                    " WHERE unit_id = ? AND status IN ('done', 'failed')",
                    (row["unit_id"],),
                )
                count += 1
        return count

    def reset_failed(self, only: list[str] | None = None) -> int:
        """Failed units (of ``only``, if given) and their failed runs become pending, to be retried."""
        with self.transaction() as db:
            failed = [r[0] for r in db.execute("SELECT unit_id FROM units WHERE status = 'failed'")]
            chosen = [u for u in failed if only is None or u in set(only)]
            for unit_id in chosen:
                db.execute(
                    "UPDATE runs SET status = 'pending' WHERE status = 'failed' AND unit_id = ?", (unit_id,)
                )
                db.execute("UPDATE units SET status = 'pending', error = NULL WHERE unit_id = ?", (unit_id,))
        return len(chosen)

    def claim(
        self, worker: str, pid: int | None = None, host: str | None = None, only: list[str] | None = None
    ) -> Claim | None:
        """Atomically take the first pending unit (among ``only``, if given); None when none is left.

        ``only`` keeps a sweep to its own units when the database also holds other sweeps' runs.
        """
        now = time.time()
        query, args = "SELECT unit_id FROM units WHERE status = 'pending'", []
        if only is not None:
            query += f" AND unit_id IN ({', '.join('?' * len(only))})"
            args = list(only)
        with self.transaction() as db:
            row = db.execute(query + " ORDER BY position LIMIT 1", args).fetchone()
            if row is None:
                return None
            unit_id = row["unit_id"]
            db.execute(
                "UPDATE units SET status = 'running', worker = ?, host = ?, pid = ?, heartbeat = ?,"
                " started_at = ?, finished_at = NULL, error = NULL, attempts = attempts + 1"
                " WHERE unit_id = ?",
                (worker, host or this_host(), os.getpid() if pid is None else pid, now, now, unit_id),
            )
            run_ids = [
                r["run_id"]
                for r in db.execute(
                    "SELECT run_id FROM runs WHERE unit_id = ? AND status != 'done' ORDER BY position",
                    (unit_id,),
                )
            ]
        return Claim(unit_id, run_ids)

    def heartbeat(self, unit_ids: Iterable[str]) -> None:
        ids = list(unit_ids)
        if not ids:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE units SET heartbeat = ? WHERE unit_id = ? AND status = 'running'",
                [(time.time(), unit_id) for unit_id in ids],
            )

    def finish_unit(self, unit_id: str) -> str:
        """Done if every run of the unit is done, else failed (with the first run error)."""
        with self.transaction() as db:
            bad = db.execute(
                "SELECT run_id, error FROM runs WHERE unit_id = ? AND status != 'done' ORDER BY position",
                (unit_id,),
            ).fetchall()
            status = "failed" if bad else "done"
            error = f"{len(bad)} run(s) not done; first: {bad[0]['error']}" if bad else None
            db.execute(
                "UPDATE units SET status = ?, error = ?, finished_at = ? WHERE unit_id = ?",
                (status, error, time.time(), unit_id),
            )
        return status

    def fail_unit(self, unit_id: str, error: str) -> None:
        """The whole unit failed (e.g. its worker crashed): every run not done gets the error."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ?"
                " WHERE unit_id = ? AND status != 'done'",
                (error, now, unit_id),
            )
            db.execute(
                "UPDATE units SET status = 'failed', error = ?, finished_at = ? WHERE unit_id = ?",
                (error, now, unit_id),
            )

    # -- run rows --------------------------------------------------------------------------------

    def config_of(self, run_id: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT run_id, config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return self._checked_run(dict(row))["config"]

    def runs_of_unit(self, unit_id: str) -> list[dict[str, Any]]:
        """run_id, kind, config (decoded) and status of the unit's runs, in order."""
        rows = self.conn.execute(
            "SELECT run_id, kind, config, status FROM runs WHERE unit_id = ? ORDER BY position", (unit_id,)
        )
        return [self._checked_run(dict(r)) for r in rows]

    def mark_running(self, run_ids: Iterable[str]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE runs SET status = 'running', started_at = ?, error = NULL"
                " WHERE run_id = ? AND status != 'done'",
                [(now, run_id) for run_id in run_ids],
            )

    def mark_failed(self, run_id: str, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
                (error, time.time(), run_id),
            )

    def record_done(self, run_id: str, result: RunResult) -> None:
        """Write a finished run's numbers; idempotent (a rerun after a kill rewrites the same row)."""
        values: dict[str, Any] = {name: getattr(result.record, name) for name in _RECORD_COLUMNS}
        values.pop("run_id")
        values["latency_ms"] = result.latency_ms
        values["layer_widths"] = result.layer_widths
        if result.dense is not None:
            values["dense_intra_acc"] = result.dense.intra_acc
            values["dense_cross_acc"] = result.dense.cross_acc
            values["dense_per_domain_acc"] = result.dense.per_domain_acc
        values = {
            k: json.dumps(v, sort_keys=True, allow_nan=False) if k in _JSON_COLUMNS else v
            for k, v in values.items()
        }
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE runs SET {assignments}, status = 'done', error = NULL, finished_at = ?"
                " WHERE run_id = ?",
                (*values.values(), time.time(), run_id),
            )
            if cur.rowcount != 1:
                raise KeyError(f"run {run_id} is not registered in {self.path}")

    # -- reading ---------------------------------------------------------------------------------

    def rows(self, status: str | None = None, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Run rows as dicts (JSON columns decoded), in registration order."""
        query, args = "SELECT * FROM runs", []
        if status is not None:
            query += " WHERE status = ?"
            args.append(status)
        rows = [dict(r) for r in self.conn.execute(query + " ORDER BY position", args)]
        if run_ids is not None:
            wanted = set(run_ids)
            rows = [r for r in rows if r["run_id"] in wanted]
        return [self._checked_run(row) for row in rows]  # only the rows asked for: others may be damaged

    def units(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM units ORDER BY position")
        return [self._checked("units", dict(r), f"unit {r['unit_id']}") for r in rows]

    def records(self, run_ids: Iterable[str] | None = None) -> list[ResultRecord]:
        """The ResultRecords of every done run (optionally only those in ``run_ids``)."""
        records = []
        for row in self.rows("done", run_ids):
            try:
                records.append(row_to_record(row))
            except ValidationError as err:
                problem = err.errors()[0]
                column, *inner = problem["loc"]
                where = f"{column}" + "".join(f"[{part!r}]" for part in inner)
                got = _shown(problem.get("input"))
                raise self._damaged(f"run {row['run_id']}", where, f"{problem['msg']} (got {got})") from None
        return records

    # -- checking what is read -------------------------------------------------------------------

    def _checked(self, table: str, row: dict[str, Any], which: str) -> dict[str, Any]:
        """``row`` if each value fits its column's declared type (SQLite stores whatever it is given)."""
        for column, value in row.items():
            kinds = _SQL_KINDS.get(self._types[table].get(column, ""))
            if value is not None and kinds is not None and not isinstance(value, kinds[0]):
                raise self._damaged(which, column, f"holds {_shown(value)}, not {kinds[1]}")
        return row

    def _checked_run(self, row: dict[str, Any]) -> dict[str, Any]:
        """A runs row, checked and with its JSON columns decoded."""
        which = f"run {row.get('run_id')}"
        self._checked("runs", row, which)
        for key in _JSON_COLUMNS:
            if row.get(key) is not None:
                try:
                    row[key] = json.loads(row[key])
                except (json.JSONDecodeError, TypeError):
                    raise self._damaged(which, key, f"holds {_shown(row[key])}, not JSON") from None
        if "criterion" in row:  # a row of an older database has IoR's alpha in its own column instead
            row["criterion_params"] = legacy_criterion_params(row.get("alpha"), row.get("criterion_params"))
        return row

    def _damaged(self, which: str, column: str, problem: str) -> DgpruneError:
        return DgpruneError(
            f"results database {self.path}: {which}: column {column} {problem}; a damaged or hand-edited "
            "row: repair it, or delete the row (`dgprune sweep` registers and runs a deleted run again)"
        )


def _label_column(key: str, value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if key in _JSON_COLUMNS and value is not None else value


# Python types of SQLite's declared column types, and how an error names them.
_SQL_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "INTEGER": (int, "a whole number"),
    "REAL": ((int, float), "a number"),
    "TEXT": (str, "text"),
}


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_to_record(row: dict[str, Any]) -> ResultRecord:
    """A NULL in a field that has a default (a field newer than the row) takes the default; every
    value is validated against the record's types (pydantic ValidationError)."""
    values = {}
    for name, spec in _RECORD_FIELDS.items():
        value = row.get(name)
        has_default = spec.default is not MISSING or spec.default_factory is not MISSING
        if value is not None or not has_default:
            values[name] = value
    values["criterion_params"] = legacy_criterion_params(row.get("alpha"), row.get("criterion_params"))
    return _RECORD_ADAPTER.validate_python(values)
