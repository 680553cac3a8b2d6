#!/usr/bin/env python3
"""Backup throughput benchmark on the lab (issue 3's "Performance" section). A benchmark, not a test.

Builds a database ``crab_bench`` in the lab container crab-postgres (server-side generate_series: text, numbers,
timestamps, to --size-mb of pg_database_size; reused when it already has that size), then runs in one session,
alternating for --rounds:

  seed   the seed's nightly script: pg_dump (plain) | gzip > file   (no upload unless --seed-upload)
  raw    pg_dump -Fc -Z0 through docker exec into /dev/null          (the floor: dump cost alone)
  ours   module_utils/crab_backup.BackupRunner end to end: pg_dump -Fc -Z0 | zstd -3, full-read verify,
         upload to s3://crab-backups/bench/ on the lab S3, head_object verify (a temp local dir; cleaned up)

and prints a Markdown table (wall time, MB/s of the database size, peak RSS of the process tree, bytes uploaded,
compression ratio) plus the ratios against the issue's targets. Traffic: 127.0.0.1 and the lab containers only.
Secrets are read from .lab/secrets/ and never printed. ``crab_bench`` is dropped only with --drop.

    python bench/backup.py                 # 1 GB database (the issue's size)
    python bench/backup.py --size-mb 300   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from module_utils.crab_backup import BackupConfig, BackupRunner, S3Store  # noqa: E402

CONTAINER = "crab-postgres"
DB = "crab_bench"
DB_USER = "crab"
ENDPOINT = "http://127.0.0.1:8333"
BUCKET = "crab-backups"
PREFIX = "bench/"
SECRETS = os.path.join(ROOT, ".lab", "secrets")
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS bench_orders (
    id          bigint PRIMARY KEY,
    tenant_id   integer NOT NULL,
    store_id    integer NOT NULL,
    customer    text NOT NULL,
    email       text NOT NULL,
    sku         text NOT NULL,
    qty         integer NOT NULL,
    unit_price  numeric(10,2) NOT NULL,
    total       numeric(12,2) NOT NULL,
    status      text NOT NULL,
    note        text,
    token       text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
"""

# Mixed, moderately compressible rows: repeated vocabulary (names, statuses, notes) plus random hex tokens,
# prices and timestamps, roughly like POS order data.
INSERT_SQL = """
INSERT INTO bench_orders
SELECT g,
       1 + (g % 50),
       1 + (g % 997),
       (ARRAY['Anna','Ben','Chloe','David','Emma','Felix','Greta','Hugo','Ida','Jonas'])[1 + (g % 10)] || ' ' ||
       (ARRAY['Meyer','Schmidt','Novak','Rossi','Dubois','Jensen','Kowalski','Silva','Berg'])[1 + (g % 9)],
       'customer' || (g % 200000) || '@example.com',
       'SKU-' || lpad(((g * 7919) % 100000)::text, 6, '0'),
       1 + (random() * 9)::int,
       round((random() * 200)::numeric, 2),
       round((random() * 2000)::numeric, 2),
       (ARRAY['open','paid','paid','paid','refunded','cancelled'])[1 + (g % 6)],
       CASE WHEN g % 4 = 0 THEN 'customer asked for ' ||
            (ARRAY['a receipt','gift wrapping','delivery next week','a discount','the loyalty card'])[1 + (g % 5)]
       END,
       md5(g::text || random()::text),
       timestamptz '2024-01-01' + (g % 31536000) * interval '1 second',
       now() - (random() * 365) * interval '1 day'
FROM generate_series(:lo::bigint, :hi::bigint) AS g;
"""


def read_secret(name: str) -> str:
    with open(os.path.join(SECRETS, name), encoding="utf-8") as handle:
        return handle.read().strip()


def admin_psql(sql: str, db: str = "postgres", variables: dict | None = None, timeout: float = 3600) -> str:
    argv = ["docker", "exec", "-i", "-u", "postgres", CONTAINER, "psql", "-X", "-A", "-t", "-q"]
    argv += ["-v", "ON_ERROR_STOP=1", "-d", db]
    for key, value in (variables or {}).items():
        argv += ["-v", f"{key}={value}"]
    proc = subprocess.run(argv, input=sql.encode(), capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench: psql on {db} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()


def db_size() -> int:
    return int(admin_psql(f"SELECT pg_database_size('{DB}')"))


def build_database(target_mb: int) -> int:
    """Create/top up crab_bench to at least target_mb (pg_database_size); reuse it if already that size."""
    target = target_mb * MB
    if admin_psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'") != "1":
        print(f"bench: creating database {DB} (owner {DB_USER})", flush=True)
        admin_psql(f"CREATE DATABASE {DB} OWNER {DB_USER}")
    admin_psql(TABLE_SQL + f"ALTER TABLE bench_orders OWNER TO {DB_USER};", db=DB)
    size = db_size()
    if size > target * 1.25:
        print(f"bench: {DB} is {size / MB:.0f} MB, more than 1.25x {target_mb} MB: truncating and refilling")
        admin_psql("TRUNCATE bench_orders; VACUUM FULL bench_orders;", db=DB)
        size = db_size()
    if size >= target:
        print(f"bench: reusing {DB} ({size / MB:.0f} MB >= {target_mb} MB)", flush=True)
        return size
    started = time.monotonic()
    next_id = int(admin_psql("SELECT coalesce(max(id), 0) + 1 FROM bench_orders", db=DB))
    bytes_per_row = 260.0  # first guess (heap + pk index); corrected from the measured growth
    while size < target:
        rows = max(10000, min(2_000_000, int((target - size) / bytes_per_row * 1.02)))
        before = size
        admin_psql(INSERT_SQL, db=DB, variables={"lo": next_id, "hi": next_id + rows - 1})
        next_id += rows
        size = db_size()
        if size > before:
            bytes_per_row = (size - before) / rows
        print(f"bench: {DB} {size / MB:.0f} / {target_mb} MB", flush=True)
    admin_psql("VACUUM ANALYZE bench_orders;", db=DB)
    size = db_size()
    print(f"bench: built {DB} ({size / MB:.0f} MB) in {time.monotonic() - started:.0f}s", flush=True)
    return size


class TreeRss:
    """Peak summed RSS of a process tree (this process and/or its descendants), polling /proc every 20 ms.

    Processes that docker exec starts inside the container (pg_dump) are not our descendants and not counted."""

    def __init__(self, include_self: bool):
        self.include_self = include_self
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _table() -> dict[int, tuple[int, int]]:
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[21]) * PAGE)  # ppid, rss
        return procs

    def sample(self) -> int:
        me = os.getpid()
        procs = self._table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        total = procs.get(me, (0, 0))[1] if self.include_self else 0
        todo = list(children.get(me, []))
        while todo:
            pid = todo.pop()
            total += procs.get(pid, (0, 0))[1]
            todo.extend(children.get(pid, []))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(0.02)

    def __enter__(self) -> TreeRss:
        self.start = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_shell(script: str, env: dict) -> None:
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}")


def run_seed(workdir: str, env: dict, store: S3Store | None, round_no: int) -> dict:
    # The seed ran `docker exec crab-postgres pg_dump -U crab crab | gzip > file`. The lab's pg_hba allows crab
    # only over TCP with a password, so the same plain dump + gzip -6 goes over -h 127.0.0.1 here.
    path = os.path.join(workdir, f"seed-{round_no}.sql.gz")
    script = f"docker exec -e PGPASSWORD {CONTAINER} pg_dump -h 127.0.0.1 -U {DB_USER} {DB} | gzip > {path}"
    started = time.monotonic()
    with TreeRss(include_self=False) as rss:
        run_shell(script, env)
        uploaded = 0
        if store is not None:
            key = f"{PREFIX}seed-{round_no}.sql.gz"
            store.client.upload_file(path, BUCKET, key)
            uploaded = os.path.getsize(path)
    wall = time.monotonic() - started
    out = os.path.getsize(path)
    os.unlink(path)
    return {"wall": wall, "rss": rss.peak, "out": out, "uploaded": uploaded, "rss_self": False}


def run_raw(env: dict) -> dict:
    script = f"docker exec -e PGPASSWORD {CONTAINER} pg_dump -h 127.0.0.1 -U {DB_USER} -Fc -Z0 {DB} > /dev/null"
    started = time.monotonic()
    with TreeRss(include_self=False) as rss:
        run_shell(script, env)
    return {"wall": time.monotonic() - started, "rss": rss.peak, "out": None, "uploaded": 0}


def run_ours(cfg: BackupConfig) -> dict:
    runner = BackupRunner(cfg)
    started = time.monotonic()
    with TreeRss(include_self=True) as rss:
        result = runner.run()
    wall = time.monotonic() - started
    local = sum(os.path.getsize(os.path.join(cfg.local_dir, n)) for n in os.listdir(cfg.local_dir) if ".dump." in n)
    for name in os.listdir(cfg.local_dir):
        if ".dump." in name:
            os.unlink(os.path.join(cfg.local_dir, name))
    return {
        "wall": wall,
        "rss": rss.peak,
        "rss_start": rss.start,
        "out": result.size,
        "uploaded": result.size,
        "raw": result.raw_size,
        "part_size": result.part_size,
        "etag_verified": result.etag_verified,
        "local": local,
    }


def cleanup_prefix(store: S3Store) -> int:
    deleted = 0
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=PREFIX):
        for obj in page.get("Contents", []):
            store.client.delete_object(Bucket=BUCKET, Key=obj["Key"])
            deleted += 1
    return deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="target pg_database_size of crab_bench (MB)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of seed / raw / ours")
    parser.add_argument("--seed-upload", action="store_true", help="also upload the seed's file (to bench/)")
    parser.add_argument("--drop", action="store_true", help="drop crab_bench at the end")
    args = parser.parse_args()

    pg_password = read_secret("pg_password")
    cfg_base = {
        "db_name": DB,
        "db_user": DB_USER,
        "db_password": pg_password,
        "container": CONTAINER,
        "bucket": BUCKET,
        "prefix": PREFIX,
        "endpoint_url": ENDPOINT,
        "access_key": read_secret("s3_access_key"),
        "secret_key": read_secret("s3_secret_key"),
        "name": "crab-bench",
        "compressor": "zstd",
        "keep_local": 1,
        "keep_remote": 100,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": pg_password}
    env["HOME"] = os.environ.get("HOME", "/root")

    size = build_database(args.size_mb)
    results: dict[str, list[dict]] = {"seed": [], "raw": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="crab-bench-") as workdir:
        local_dir = os.path.join(workdir, "backups")
        cfg = BackupConfig(**cfg_base, local_dir=local_dir, state_file=os.path.join(workdir, "state.json"))
        store = S3Store(cfg)
        try:
            for rnd in range(1, args.rounds + 1):
                for name in ("seed", "raw", "ours"):
                    print(f"bench: round {rnd}: {name} ...", flush=True)
                    if name == "seed":
                        res = run_seed(workdir, env, store if args.seed_upload else None, rnd)
                    elif name == "raw":
                        res = run_raw(env)
                    else:
                        res = run_ours(cfg)
                        time.sleep(1.1)  # backup names have one-second resolution
                    print(f"bench: round {rnd}: {name} {res['wall']:.1f}s", flush=True)
                    results[name].append(res)
        finally:
            removed = cleanup_prefix(store)
            print(f"bench: removed {removed} object(s) under s3://{BUCKET}/{PREFIX}", flush=True)
    if args.drop:
        admin_psql(f"DROP DATABASE IF EXISTS {DB}")
        print(f"bench: dropped {DB}")

    report(size, args, results)
    return 0


def report(size: int, args, results: dict[str, list[dict]]) -> None:
    mb = size / MB
    ours_raw = statistics.median(r["raw"] for r in results["ours"])
    labels = {
        "seed": "seed: pg_dump (plain) \\| gzip -6 > file" + (" + upload" if args.seed_upload else ""),
        "raw": "raw: pg_dump -Fc -Z0 > /dev/null",
        "ours": "ours: BackupRunner (-Fc -Z0 \\| zstd -3, verify, S3)",
    }
    med = {}
    print()
    print(f"Database `{DB}`: {mb:.0f} MB (pg_database_size), {args.rounds} round(s), median wall time per row.")
    print(f"Ratio = uncompressed `-Fc -Z0` dump ({ours_raw / MB:.0f} MB) / bytes written.")
    print()
    print("| run | wall s | MB/s (DB size) | peak RSS MB (tree) | bytes written | bytes uploaded | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("seed", "raw", "ours"):
        rows = results[name]
        wall = statistics.median(r["wall"] for r in rows)
        med[name] = wall
        rss = max(r["rss"] for r in rows) / MB
        out = rows[-1]["out"]
        uploaded = rows[-1]["uploaded"]
        ratio = f"{ours_raw / out:.2f}" if out else "-"
        written = f"{out:,}" if out is not None else "0 (/dev/null)"
        print(f"| {labels[name]} | {wall:.1f} | {mb / wall:.1f} | {rss:.0f} | {written} | {uploaded:,} | {ratio} |")
    speedup = med["seed"] / med["ours"]
    slowdown = med["ours"] / med["raw"]
    peak = max(r["rss"] for r in results["ours"]) / MB
    local = max(r["local"] for r in results["ours"])
    print()
    print("| target (issue 3) | measured | result |")
    print("|---|---:|---|")
    print(f"| ours >= 4x the seed's throughput | {speedup:.2f}x | {'PASS' if speedup >= 4 else 'MISS'} |")
    print(f"| ours <= 1.3x raw pg_dump's wall time | {slowdown:.2f}x | {'PASS' if slowdown <= 1.3 else 'MISS'} |")
    print(f"| peak RSS <= 100 MB (host process tree) | {peak:.0f} MB | {'PASS' if peak <= 100 else 'MISS'} |")
    last = results["ours"][-1]
    print(
        f"| local disk <= 1x compressed size | {local / last['out']:.2f}x | "
        f"{'PASS' if local <= last['out'] else 'MISS'} |"
    )
    print()
    print(
        f"ours: part size {last['part_size'] // MB} MiB, ETag verified: {last['etag_verified']}. Peak RSS of ours "
        f"includes this Python process ({last['rss_start'] / MB:.0f} MB before the run) plus docker CLI, zstd and "
        "pg_restore; pg_dump itself runs in the container and is not counted for any row."
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
