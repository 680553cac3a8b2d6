"""Round trip of schemas no one here wrote: the shared corpus's chinook (data) and pagila (partitions, domains,
enums, triggers, functions, views) are loaded into the test PostgreSQL, backed up to S3 by the real pipeline,
restored into new databases, and compared through pg_catalog on both sides: every table's row count, every sequence
value, function, trigger, partition, view and type. The corpus is read in place (never copied into the repo); if it
is absent the corpus_dir fixture raises an error, it does not skip."""

import subprocess
from dataclasses import replace

import pytest

from module_utils.crab_backup import BackupRunner, Restorer
from tests.unit.test_backup_fixtures import backup_cfg, pg_server, s3_server

# pytest finds fixtures by name in this module's namespace: these imports are how the tests get them.
FIXTURES = (backup_cfg, pg_server, s3_server)

CATALOG = {
    # exact row count of every table, partitioned parents and partitions included (unpopulated materialized
    # views cannot be counted: "views" compares their definition and whether they are populated)
    "rows": """
        SELECT n.nspname || '.' || c.relname,
               (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname),
                                                    false, true, '')))[1]::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND n.nspname = 'public' ORDER BY 1""",
    "sequences": """
        SELECT schemaname || '.' || sequencename, coalesce(last_value::text, 'unused'), increment_by::text
        FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1""",
    "functions": """
        SELECT p.oid::regprocedure::text, p.prokind::text,
               CASE WHEN p.prokind = 'a' THEN '' ELSE md5(pg_get_functiondef(p.oid)) END
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t WHERE NOT t.tgisinternal ORDER BY 1, 2""",
    "partitions": """
        SELECT i.inhparent::regclass::text, i.inhrelid::regclass::text, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid ORDER BY 1, 2""",
    "views": """
        SELECT c.oid::regclass::text, c.relkind::text, c.relispopulated::text, md5(pg_get_viewdef(c.oid))
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND n.nspname = 'public' ORDER BY 1""",
    "types": """
        SELECT t.oid::regtype::text, t.typtype::text, format_type(t.typbasetype, t.typtypmod),
               coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e
                         WHERE e.enumtypid = t.oid), '')
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype IN ('d', 'e') ORDER BY 1""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' ORDER BY 1""",
}
# Give every sequence a distinct, non-default value so "sequence values match" means something on a schema-only load.
BUMP_SEQUENCES = """
DO $$
DECLARE s record; i int := 0;
BEGIN
  FOR s IN SELECT schemaname, sequencename FROM pg_sequences WHERE schemaname = 'public' ORDER BY 2 LOOP
    i := i + 1;
    PERFORM setval(format('%I.%I', s.schemaname, s.sequencename), 1000 + 37 * i);
  END LOOP;
END $$;
"""


def _admin(pg_server, sql: str, db: str) -> str:
    try:
        return pg_server.admin(sql, db=db)
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"psql on {db} failed: {exc.stderr[-2000:]}") from exc


def _catalog(pg_server, db: str) -> dict[str, list[str]]:
    return {name: _admin(pg_server, sql, db).splitlines() for name, sql in CATALOG.items()}


def _load(pg_server, corpus_dir, source: str, db: str) -> None:
    text = (corpus_dir / "postgres" / source).read_text(encoding="utf-8")
    pg_server.admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE); CREATE DATABASE "{db}" OWNER crab;')
    if source == "chinook.sql":
        # The script creates and connects to its own database: load what follows `\c chinook;` as the owner crab.
        pg_server.sql(db, text.split("\\c chinook;", 1)[1])
    else:
        # pagila's objects belong to postgres; the backup user must own (and so read) them: load as the superuser
        # with ownership handed to crab. The file itself is read in place, never changed on disk.
        _admin(pg_server, text.replace("OWNER TO postgres;", "OWNER TO crab;"), db)
        _admin(pg_server, BUMP_SEQUENCES, db)


@pytest.mark.parametrize(("source", "expect"), [("chinook.sql", "rows"), ("pagila-schema.sql", "partitions")])
def test_corpus_round_trip_keeps_every_object(backup_cfg, pg_server, corpus_dir, source, expect):
    db = "corpus_" + source.split("-")[0].split(".")[0]
    restored = db + "_restored"
    _load(pg_server, corpus_dir, source, db)
    pg_server.admin(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE);')
    cfg = replace(backup_cfg, db_name=db)
    result = BackupRunner(cfg).run()
    Restorer(cfg).restore(restored, key=result.key)
    before = _catalog(pg_server, db)
    after = _catalog(pg_server, restored)
    for name in CATALOG:
        assert after[name] == before[name], f"{source}: {name} differ after the round trip"
    print(f"{source}: matched " + ", ".join(f"{len(v)} {k}" for k, v in before.items()))
    # The comparison is not vacuous: what each schema is known for is there.
    assert before[expect], f"{source}: no {expect} found; the corpus did not load"
    if source == "chinook.sql":
        rows = {line.split("|")[0]: int(line.split("|")[1]) for line in before["rows"]}
        assert len(rows) == 11 and rows["public.track"] == 3503 and sum(rows.values()) > 15000, rows
    else:
        assert len(before["partitions"]) >= 7 and before["triggers"] and before["functions"] and before["views"]
        assert any("|d|" in t for t in before["types"]) and any("|e|" in t for t in before["types"])
        assert all("unused" not in s for s in before["sequences"]) and len(before["sequences"]) >= 10
    pg_server.admin(f'DROP DATABASE "{restored}" WITH (FORCE); DROP DATABASE "{db}" WITH (FORCE);')
