"""Seed the lab's POS database (crab) once, to CRAB_LAB_SEED_MB megabytes on disk (pg_database_size).

Runs on the lab machine and talks to PostgreSQL through `docker exec -i crab-postgres psql` over TCP
127.0.0.1 with the crab password (password auth exercised, nothing on the host's argv). Rows are generated
server-side with generate_series; the append-only event_log carries a SHA-256 hash chain
(hash = sha256(prev_hash|id|occurred_at|kind|payload)), extended by a plpgsql function.
Idempotent: a finished seed is recorded in lab_seed and the script then does nothing.
"""

import argparse
import os
import subprocess
import sys
import time

SCHEMA = r"""
CREATE TABLE IF NOT EXISTS tenants (
    id integer PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS stores (
    id integer PRIMARY KEY,
    tenant_id integer NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    city text NOT NULL,
    timezone text NOT NULL DEFAULT 'Europe/Berlin'
);
CREATE TABLE IF NOT EXISTS products (
    id integer PRIMARY KEY,
    tenant_id integer NOT NULL REFERENCES tenants(id),
    sku text NOT NULL,
    name text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    vat_rate numeric(4, 2) NOT NULL DEFAULT 19.00,
    UNIQUE (tenant_id, sku)
);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    store_id integer NOT NULL REFERENCES stores(id),
    created_at timestamptz NOT NULL,
    status text NOT NULL CHECK (status IN ('open', 'paid', 'refunded', 'void')),
    total_cents bigint NOT NULL,
    currency char(3) NOT NULL DEFAULT 'EUR',
    note text
);
CREATE INDEX IF NOT EXISTS orders_store_created ON orders (store_id, created_at);
CREATE TABLE IF NOT EXISTS order_items (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders(id),
    product_id integer NOT NULL REFERENCES products(id),
    qty integer NOT NULL CHECK (qty > 0),
    unit_price_cents integer NOT NULL
);
CREATE INDEX IF NOT EXISTS order_items_order ON order_items (order_id);
CREATE TABLE IF NOT EXISTS payments (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders(id),
    method text NOT NULL CHECK (method IN ('cash', 'card', 'voucher')),
    amount_cents bigint NOT NULL,
    paid_at timestamptz NOT NULL,
    reference text NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_order ON payments (order_id);
CREATE TABLE IF NOT EXISTS event_log (
    id bigint PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    store_id integer NOT NULL REFERENCES stores(id),
    kind text NOT NULL,
    payload jsonb NOT NULL,
    prev_hash char(64) NOT NULL,
    hash char(64) NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS lab_seed (
    seeded_at timestamptz NOT NULL DEFAULT now(),
    target_mb integer NOT NULL,
    size_bytes bigint NOT NULL,
    orders bigint NOT NULL
);

CREATE OR REPLACE FUNCTION event_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_log is append-only (% refused)', TG_OP;
END $$;
DROP TRIGGER IF EXISTS event_log_append_only ON event_log;
CREATE TRIGGER event_log_append_only BEFORE UPDATE OR DELETE ON event_log
    FOR EACH ROW EXECUTE FUNCTION event_log_append_only();

CREATE OR REPLACE FUNCTION event_log_hash(prev char(64), id bigint, at timestamptz, kind text, payload jsonb)
RETURNS char(64) LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(prev || '|' || id || '|' || to_char(at AT TIME ZONE 'UTC',
        'YYYY-MM-DD"T"HH24:MI:SS.US') || '|' || kind || '|' || payload::text, 'UTF8')), 'hex')
$$;

-- Append one event per order in [first_order, last_order], chaining hashes in id order.
CREATE OR REPLACE FUNCTION event_log_extend(first_order bigint, last_order bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    prev char(64);
    next_id bigint;
    r record;
    n bigint := 0;
BEGIN
    SELECT e.hash, e.id + 1 INTO prev, next_id FROM event_log e ORDER BY e.id DESC LIMIT 1;
    IF prev IS NULL THEN
        prev := repeat('0', 64);
        next_id := 1;
    END IF;
    FOR r IN SELECT o.id, o.store_id, o.created_at, o.total_cents, o.status FROM orders o
             WHERE o.id BETWEEN first_order AND last_order ORDER BY o.id LOOP
        DECLARE
            p jsonb := jsonb_build_object('order_id', r.id, 'total_cents', r.total_cents, 'status', r.status);
            h char(64) := event_log_hash(prev, next_id, r.created_at, 'order.' || r.status, p);
        BEGIN
            INSERT INTO event_log VALUES (next_id, r.created_at, r.store_id, 'order.' || r.status, p, prev, h);
            prev := h;
            next_id := next_id + 1;
            n := n + 1;
        END;
    END LOOP;
    RETURN n;
END $$;
"""

REFERENCE = """
INSERT INTO tenants (id, name)
    SELECT g, 'Tenant ' || g FROM generate_series(1, 20) g ON CONFLICT DO NOTHING;
INSERT INTO stores (id, tenant_id, name, city)
    SELECT g, 1 + (g % 20), 'Store ' || g,
           (ARRAY['Berlin', 'Hamburg', 'Munich', 'Cologne', 'Leipzig', 'Dresden'])[1 + g % 6]
    FROM generate_series(1, 200) g ON CONFLICT DO NOTHING;
INSERT INTO products (id, tenant_id, sku, name, price_cents, vat_rate)
    SELECT g, 1 + (g % 20), 'SKU-' || lpad(g::text, 6, '0'), 'Product ' || md5(g::text),
           99 + (g * 37) % 4900, CASE WHEN g % 3 = 0 THEN 7.00 ELSE 19.00 END
    FROM generate_series(1, 5000) g ON CONFLICT DO NOTHING;
"""

# One batch: :n orders with 3 items each, one payment each, one chained event each.
BATCH = """
BEGIN;
CREATE TEMP TABLE new_orders ON COMMIT DROP AS
WITH ins AS (
    INSERT INTO orders (store_id, created_at, status, total_cents, note)
    SELECT 1 + (g % 200),
           timestamptz '2024-01-01 00:00:00+00' + make_interval(secs => (:off + g) * 17.3 + random() * 10),
           (ARRAY['paid', 'paid', 'paid', 'paid', 'refunded', 'void', 'open'])[1 + g % 7],
           0,
           CASE WHEN g % 11 = 0 THEN 'customer note ' || md5(g::text) END
    FROM generate_series(1, :n) g
    RETURNING id
) SELECT id FROM ins;
INSERT INTO order_items (order_id, product_id, qty, unit_price_cents)
    SELECT o.id, p.id, 1 + (o.id + k) % 4, p.price_cents
    FROM new_orders o CROSS JOIN generate_series(1, 3) k
    JOIN products p ON p.id = 1 + ((o.id * 7919 + k * 104729) % 5000);
UPDATE orders o SET total_cents = s.total
    FROM (SELECT order_id, sum(qty * unit_price_cents) AS total FROM order_items
          WHERE order_id IN (SELECT id FROM new_orders) GROUP BY order_id) s
    WHERE o.id = s.order_id;
INSERT INTO payments (order_id, method, amount_cents, paid_at, reference)
    SELECT o.id, (ARRAY['cash', 'card', 'card', 'voucher'])[1 + o.id % 4], o.total_cents,
           o.created_at + interval '30 seconds', 'TX-' || md5(o.id::text)
    FROM orders o WHERE o.id IN (SELECT id FROM new_orders) AND o.status <> 'open';
SELECT event_log_extend((SELECT min(id) FROM new_orders), (SELECT max(id) FROM new_orders));
COMMIT;
"""


def psql(sql, password, container, variables=None, check=True):
    args = ["docker", "exec", "-i", "-e", "PGPASSWORD", container, "psql", "-h", "127.0.0.1", "-U", "crab", "-d"]
    args += ["crab", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"]
    for key, value in (variables or {}).items():
        args += ["-v", f"{key}={value}"]
    env = dict(os.environ, PGPASSWORD=password)
    proc = subprocess.run(args, input=sql, text=True, capture_output=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"seed_pos: psql failed in {container} (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def main():
    parser = argparse.ArgumentParser(description="Seed the lab POS database once.")
    parser.add_argument("--password-file", required=True, help="file holding the crab user's password")
    parser.add_argument("--container", default="crab-postgres")
    parser.add_argument("--mb", type=int, default=int(os.environ.get("CRAB_LAB_SEED_MB", "100")))
    parser.add_argument("--batch", type=int, default=20000, help="orders per batch (about 25 MB each)")
    args = parser.parse_args()
    with open(args.password_file, encoding="utf-8") as fh:
        password = fh.read().strip()

    exists = psql("SELECT to_regclass('public.lab_seed') IS NOT NULL", password, args.container)
    done = exists == "t" and psql("SELECT count(*) > 0 FROM lab_seed", password, args.container) == "t"
    if done:
        size = psql("SELECT pg_database_size(current_database())", password, args.container)
        print(f"seed_pos: already seeded ({int(size) / 1e6:.0f} MB)")
        return 0
    start = time.monotonic()
    psql(SCHEMA + REFERENCE, password, args.container)
    target = args.mb * 1024 * 1024
    while True:
        size = int(psql("SELECT pg_database_size(current_database())", password, args.container))
        if size >= target:
            break
        offset = psql("SELECT count(*) FROM orders", password, args.container)
        psql(BATCH, password, args.container, {"n": args.batch, "off": offset})
    psql("VACUUM ANALYZE", password, args.container)
    orders = psql(
        "INSERT INTO lab_seed (target_mb, size_bytes, orders) "
        "SELECT :mb, pg_database_size(current_database()), (SELECT count(*) FROM orders) RETURNING orders",
        password,
        args.container,
        {"mb": args.mb},
    )
    print(f"seed_pos: seeded {orders} orders, {size / 1e6:.0f} MB in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
