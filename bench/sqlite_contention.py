#!/usr/bin/env python3
"""SQLite write contention in WAL mode: busy_timeout x transaction mode x writers (issue 5's study).

Each writer is its own process with its own connection, like the edge server's writers. A transaction reads
(the writer's last sequence number) and then writes (the next row), as an app does that reads before it writes.
  DEFERRED:  BEGIN; SELECT; INSERT; COMMIT   - the read lock is upgraded at the INSERT
  IMMEDIATE: BEGIN IMMEDIATE; SELECT; INSERT; COMMIT - the write lock is taken up front (waits in busy_timeout)
A transaction that gets SQLITE_BUSY is rolled back and retried up to --retries times; after that the write is
lost. Lost writes are counted, and every committed write is checked against the table afterwards.

Standard library only, so it runs on an edge host as the DB owner:
    python3 bench/sqlite_contention.py --db /tmp/contention.db --seconds 3
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
import time


def writer(db: str, wid: int, txn: str, busy_ms: int, retries: int, seconds: float, start_at: float, out) -> None:
    conn = sqlite3.connect(db, timeout=busy_ms / 1000.0, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA synchronous = NORMAL")
    begin = "BEGIN IMMEDIATE" if txn == "IMMEDIATE" else "BEGIN DEFERRED"
    commits = busy = lost = 0
    seq = 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    while time.time() < deadline:
        for attempt in range(retries + 1):
            try:
                conn.execute(begin)
                last = conn.execute("SELECT coalesce(max(seq), 0) FROM ledger WHERE writer = ?", (wid,)).fetchone()[0]
                conn.execute(
                    "INSERT INTO ledger (writer, seq, payload) VALUES (?, ?, ?)", (wid, last + 1, os.urandom(64).hex())
                )
                conn.execute("COMMIT")
                commits += 1
                seq = last + 1
                break
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                busy += 1
                if attempt == retries:
                    lost += 1
    conn.close()
    out.put({"writer": wid, "commits": commits, "busy": busy, "lost": lost, "last_seq": seq})


def run_case(db: str, writers: int, txn: str, busy_ms: int, retries: int, seconds: float) -> dict:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, writer INTEGER, seq INTEGER, payload TEXT)")
    conn.execute("CREATE INDEX ledger_writer ON ledger (writer, seq)")
    conn.close()
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 0.5
    procs = [
        mp.Process(target=writer, args=(db, w, txn, busy_ms, retries, seconds, start_at, out)) for w in range(writers)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    conn = sqlite3.connect(db)
    rows = dict(conn.execute("SELECT writer, count(*) FROM ledger GROUP BY writer").fetchall())
    gaps = conn.execute(
        "SELECT count(*) FROM (SELECT writer, seq, lag(seq) OVER (PARTITION BY writer ORDER BY seq) AS prev "
        "FROM ledger) WHERE prev IS NOT NULL AND seq != prev + 1"
    ).fetchone()[0]
    conn.close()
    commits = sum(r["commits"] for r in results)
    mismatched = sum(1 for r in results if rows.get(r["writer"], 0) != r["commits"])
    return {
        "writers": writers,
        "txn": txn,
        "busy_timeout_ms": busy_ms,
        "commits_per_s": round(commits / seconds, 1),
        "busy": sum(r["busy"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "rows_match_commits": mismatched == 0 and gaps == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="scratch database path (deleted and recreated per case)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--retries", type=int, default=3, help="app retries after SQLITE_BUSY (SQLITE_BUSY_RETRIES)")
    parser.add_argument("--writers", default="1,4,8")
    parser.add_argument("--busy", default="0,5000", help="busy_timeout values in ms")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()
    db = args.db or os.path.join(tempfile.mkdtemp(prefix="crab-sq-bench-"), "contention.db")
    rows = []
    for writers in (int(w) for w in args.writers.split(",")):
        for busy_ms in (int(b) for b in args.busy.split(",")):
            for txn in ("DEFERRED", "IMMEDIATE"):
                rows.append(run_case(db, writers, txn, busy_ms, args.retries, args.seconds))
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"sqlite {sqlite3.sqlite_version}, {args.seconds:g} s per case, {args.retries} retries after SQLITE_BUSY")
        print()
        print("| writers | busy_timeout ms | transaction | commits/s | SQLITE_BUSY | lost writes | rows = commits |")
        print("|---:|---:|---|---:|---:|---:|---|")
        for r in rows:
            print(
                f"| {r['writers']} | {r['busy_timeout_ms']} | {r['txn']} | {r['commits_per_s']} | {r['busy']} | "
                f"{r['lost']} | {'yes' if r['rows_match_commits'] else 'NO'} |"
            )


if __name__ == "__main__":
    main()
