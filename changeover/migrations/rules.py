"""The lint rules: id, severity, the phase a finding puts its statement in, and the safe recipe.

Severity `error` fails `migrate lint` and makes a migration unsafe; `notice` marks an operation
that is fine *as a contract step* (dropping what old code may still use); `warning` is hygiene
that does not change the phase. Lock facts are the ones measured on PostgreSQL 15 (field notes).
"""

from __future__ import annotations

from dataclasses import dataclass

from changeover.migrations.sqltext import POSTGRES, SQLITE


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str   # error | notice | warning
    phase: str      # expand | contract | unsafe: what a finding does to its statement
    recipe: str
    dialects: tuple[str, ...] = (POSTGRES,)


_BOTH = (POSTGRES, SQLITE)

RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("parse-error", "error", "unsafe",
         "Fix the syntax; the position is where PostgreSQL's own parser stopped."),
    Rule("adding-volatile-default", "error", "unsafe",
         "1) ADD COLUMN without a default (instant); 2) ALTER COLUMN ... SET DEFAULT <expr> (new rows only, "
         "instant); 3) fill old rows with `-- changeover:backfill table=T` over "
         "`UPDATE T SET col = <expr> WHERE col IS NULL`."),
    Rule("adding-serial-column", "error", "unsafe",
         "Add a nullable bigint column; CREATE SEQUENCE; SET DEFAULT nextval(...) for new rows; backfill old "
         "rows in batches; then NOT NULL through a validated CHECK (see setting-not-null)."),
    Rule("adding-stored-generated-column", "error", "unsafe",
         "Add a plain nullable column, keep it filled by a trigger (or the application) for new rows, and "
         "backfill old rows in batches."),
    Rule("changing-column-type", "error", "unsafe",
         "Expand: add a column of the new type, keep both in sync with a trigger, backfill in batches. Next "
         "release reads the new column. Contract: drop the old column. (Widening varchar(n) or to text is "
         "binary coercible and not flagged.)"),
    Rule("setting-not-null", "error", "unsafe",
         "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; in a later migration VALIDATE CONSTRAINT c "
         "(reads and writes go on); then SET NOT NULL skips its scan (PostgreSQL 12+) and the CHECK can go."),
    Rule("index-not-concurrent", "error", "unsafe",
         "CREATE INDEX CONCURRENTLY: writes go on. changeover runs the migration outside a transaction "
         "and drops an INVALID leftover index before retrying."),
    Rule("drop-index-not-concurrent", "error", "unsafe",
         "DROP INDEX CONCURRENTLY (changeover runs it outside a transaction)."),
    Rule("reindex-not-concurrent", "error", "unsafe",
         "REINDEX (CONCURRENTLY) ... or REINDEX ... CONCURRENTLY (PostgreSQL 12+)."),
    Rule("concurrently-in-transaction", "error", "unsafe",
         "Remove BEGIN/COMMIT and `-- changeover:transaction on`: changeover runs migrations with "
         "CONCURRENTLY statement by statement on its own."),
    Rule("constraint-missing-not-valid", "error", "unsafe",
         "ADD CONSTRAINT ... NOT VALID (brief lock, no scan); VALIDATE CONSTRAINT in a later migration "
         "(SHARE UPDATE EXCLUSIVE: reads and writes go on)."),
    Rule("unique-without-index", "error", "unsafe",
         "CREATE UNIQUE INDEX CONCURRENTLY i ON t (cols); then ALTER TABLE t ADD CONSTRAINT c UNIQUE "
         "USING INDEX i (or PRIMARY KEY USING INDEX i): instant."),
    Rule("exclusion-constraint", "error", "unsafe",
         "There is no concurrent way to build an exclusion constraint: add it with the table, enforce the "
         "rule in the application, or `-- changeover:ignore exclusion-constraint <why the table is small>`."),
    Rule("dropping-column", "notice", "contract",
         "Expand: stop reading and writing the column (drop NOT NULL or give it a default so old INSERTs "
         "still work). Contract, after the old code is gone: DROP COLUMN with `-- changeover:phase contract`.",
         _BOTH),
    Rule("dropping-table", "notice", "contract",
         "Stop using the table in the code first; drop it in a contract migration once no older release "
         "is live.", _BOTH),
    Rule("dropping-object", "notice", "contract",
         "Old code may still use it: drop it in a contract migration once no older release is live.", _BOTH),
    Rule("renaming-column", "error", "unsafe",
         "Expand: add the new column, sync both with a trigger, backfill in batches; the new release reads "
         "the new column. Contract: drop the old column and the trigger.", _BOTH),
    Rule("renaming-table", "error", "unsafe",
         "Expand: rename the table and CREATE VIEW <old name> AS SELECT * FROM <new name> (simple views "
         "are updatable), in one migration. Contract: drop the view.", _BOTH),
    Rule("adding-required-column", "error", "unsafe",
         "Add the column nullable (or with a constant default: instant on PostgreSQL 11+), backfill in "
         "batches, then NOT NULL through a validated CHECK; old code's INSERTs keep working.", _BOTH),
    Rule("unbatched-backfill", "error", "unsafe",
         "Declare `-- changeover:backfill table=T batch=1000` above `UPDATE T SET ... WHERE col IS NULL`: "
         "it runs in primary-key batches, each its own short transaction, resumable.", _BOTH),
    Rule("backfill-without-update", "error", "unsafe",
         "Put the `UPDATE T SET ... WHERE col IS NULL` that fills the column in the same file as its "
         "`-- changeover:backfill table=T` directive (and check the table name).", _BOTH),
    Rule("phase-mismatch", "error", "unsafe",
         "A migration marked `phase expand` must only hold backward compatible changes: move the "
         "contract statements into their own migration marked `-- changeover:phase contract`.", _BOTH),
    Rule("unjudged", "error", "unsafe",
         "Read what the statement locks and whether old code survives it; if it is safe, confirm with "
         "`-- changeover:ignore unjudged <reason>` on the line above it."),
    Rule("truncating-table", "error", "unsafe",
         "TRUNCATE empties the table at once under ACCESS EXCLUSIVE, and the running code loses its rows. "
         "Delete what must go with `-- changeover:backfill table=T` over `DELETE FROM T WHERE ...` (batched), "
         "or truncate in a contract migration a table no release reads any more (ignore with the reason)."),
    Rule("locking-table", "error", "unsafe",
         "Remove the LOCK TABLE: every statement takes the lock it needs, changeover gives each a short "
         "lock_timeout and retries; an explicit strong lock is held until commit and blocks the application "
         "for the whole migration."),
    Rule("table-rewrite", "error", "unsafe",
         "There is no online form: run it in a maintenance window (`migrate up --allow-unsafe`), use "
         "pg_repack for VACUUM FULL / CLUSTER, or create the table that way from the start (free on a new "
         "table)."),
    Rule("refresh-matview-not-concurrent", "error", "unsafe",
         "REFRESH MATERIALIZED VIEW CONCURRENTLY (needs a UNIQUE index on the view): reads go on while it "
         "refreshes."),
    Rule("transaction-incompatible", "error", "unsafe",
         "Put the statement in a migration of its own with `-- changeover:transaction off` (PostgreSQL "
         "refuses to run it inside a transaction block)."),
    Rule("slow-under-held-lock", "error", "unsafe",
         "Split into two migrations: the statement that takes the strong lock commits at once in the first; "
         "the slow statement runs in the next, holding only its own weaker lock (each migration is one "
         "transaction, and every lock is held until it commits)."),
    Rule("dropping-constraint", "notice", "contract",
         "Old code may rely on it (ON CONFLICT (col) needs the unique index; a CHECK or FK keeps its data "
         "valid): drop it in a contract migration once no older release is live.", _BOTH),
    Rule("dropping-default", "notice", "contract",
         "Old code's INSERTs that omit the column would store NULL (or fail on NOT NULL): drop the default "
         "in a contract migration once no older release is live.", _BOTH),
    Rule("renaming-object", "error", "unsafe",
         "Expand: create the object under the new name beside the old one (CREATE VIEW new AS SELECT * FROM "
         "old-view's query; CREATE FUNCTION new(...) with the same body, or one calling the other); the new "
         "release uses the new name. Contract: drop the old one."),
    Rule("prefer-bigint", "warning", "expand",
         "Use bigint (or bigint GENERATED ALWAYS AS IDENTITY) for keys: int runs out at 2^31 and the later "
         "int -> bigint change rewrites the table."),
    Rule("prefer-timestamptz", "warning", "expand",
         "Use timestamptz: timestamp without time zone loses the offset and changing it later rewrites."),
    Rule("prefer-text", "warning", "expand",
         "Use text (with CHECK (length(col) <= n) NOT VALID if a limit matters): raising a varchar limit "
         "is cheap but lowering it rewrites."),
    Rule("prefer-identity", "warning", "expand",
         "Use bigint GENERATED ALWAYS AS IDENTITY instead of serial: standard SQL, and the sequence is "
         "owned and permissioned with the table."),
    Rule("prefer-text-over-char", "warning", "expand",
         "Use text (or varchar): char(n) pads every value with blanks to n characters, and comparing or "
         "changing it later surprises."),
    Rule("identifier-too-long", "warning", "expand",
         "Keep names to 63 bytes: PostgreSQL truncates longer ones silently, so two long names with the same "
         "first 63 bytes collide and the catalog shows another name than the migration."),
)}

# Rules about a lock held or a table rewritten: harmless when the table is empty (nobody waits, nothing
# is copied), so on an empty table or one created earlier in the same run they become notices.
LOCK_RULES = frozenset({
    "adding-volatile-default", "adding-serial-column", "adding-stored-generated-column", "changing-column-type",
    "setting-not-null", "index-not-concurrent", "drop-index-not-concurrent", "reindex-not-concurrent",
    "constraint-missing-not-valid", "unique-without-index", "exclusion-constraint", "truncating-table",
    "table-rewrite", "refresh-matview-not-concurrent", "locking-table", "slow-under-held-lock",
})
# NOT NULL without a default fails on rows and breaks old INSERTs: harmless only on a table that this run
# creates (no running release knows it, no rows). Renames and drops stay what they are: the release
# being deployed, not only the old one, must agree with them.
COMPAT_RULES = frozenset({"adding-required-column"})

PHASE_ORDER = {"expand": 0, "contract": 1, "unsafe": 2}

LOCK_BLOCKS = {
    "ACCESS EXCLUSIVE": "reads and writes",
    "EXCLUSIVE": "writes",
    "SHARE ROW EXCLUSIVE": "writes",
    "SHARE": "writes",
    "SHARE UPDATE EXCLUSIVE": "nothing (other DDL only)",
    "ROW EXCLUSIVE": "rows it touches",
    "ROW SHARE": "nothing (EXCLUSIVE locks only)",
    "ACCESS SHARE": "nothing (ACCESS EXCLUSIVE only)",
    "none": "nothing",
    "unknown": "unknown (not judged)",
    "database write lock": "writes (SQLite: whole database)",
}

LOCK_RANK = {k: i for i, k in enumerate(
    ("none", "unknown", "ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
     "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "database write lock", "ACCESS EXCLUSIVE"))}


def worst_phase(*phases: str) -> str:
    return max(phases, key=PHASE_ORDER.__getitem__, default="expand")


def blocks_writes(lock: str) -> bool:
    return LOCK_RANK.get(lock, 0) >= LOCK_RANK["SHARE"]


def strongest_lock(*locks: str) -> str:
    return max(locks, key=lambda k: LOCK_RANK.get(k, 0), default="none")
