#!/usr/bin/env python3
"""Times the hourly `key.expiring` check's SELECT on a keygate SQLite database, with the index
`api_keys_by_expiry` and with it dropped (BENCHMARKS.md "The expiry check, timed").

    scripts/expiry_timing.py DB N EVERY

DB: a database `keygate serve` has migrated (any path; it is copied to /dev/shm, not changed).
N keys are written into the copy: one in EVERY expires within the week, one in ten a month
later, the rest never; one in twenty is disabled. Five timings each. Not a test.
"""
import os
import shutil
import sqlite3
import sys
import time
import uuid

src, n, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = "/dev/shm/keygate-expiry-timing.db"


def remove():
    for x in ("", "-wal", "-shm"):
        if os.path.exists(db + x):
            os.remove(db + x)


remove()
shutil.copy(src, db)
c = sqlite3.connect(db)
c.execute("PRAGMA journal_mode=WAL")
now = int(time.time() * 1000)
DAY = 86400000
c.execute("INSERT INTO clients (client_id, license, created_at) VALUES ('c', 'default', ?)", (now,))


def rows():
    for i in range(n):
        if i % every == 0:
            exp = now + (i // every % 7 + 1) * DAY - 1000
        elif i % 10 == 1:
            exp = now + 30 * DAY + i
        else:
            exp = None
        yield (str(uuid.UUID(int=i)), "c", f"k{i}", "kg_live_ab", os.urandom(32), "[]",
               0 if i % 20 == 7 else 1, now, now, exp)


c.executemany("INSERT INTO api_keys (id, client_id, name, prefix, key_hash, permissions, enabled, "
              "created_at, updated_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)", rows())
c.commit()
# KEY_COLUMNS and EXPIRING_KEYS of src/keys/store/sqlite.rs and sqlite_outbox.rs
COLS = ("k.id, k.client_id, k.name, k.prefix, k.key_hash, k.previous_hash, k.previous_valid_until, "
        "k.permissions, k.enabled, k.created_at, k.updated_at, k.expires_at, k.last_used_at, "
        "k.rotated_at, k.rate_limit, k.metadata, k.disabled_by, k.expires_set_by, "
        "k.rate_limit_set_by, k.tokens_valid_after")
Q = f"SELECT {COLS} FROM api_keys k WHERE k.enabled = 1 AND k.expires_at > ? AND k.expires_at <= ?"


def timed(label):
    args = (now, now + 7 * DAY)
    plan = "; ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + Q, args))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        got = c.execute(Q, args).fetchall()
        ts.append((time.perf_counter() - t) * 1000)
    print(f"{label}: {len(got):,} of {n:,} keys; {', '.join(f'{x:.2f}' for x in ts)} ms; {plan}")


timed("with api_keys_by_expiry")
c.execute("DROP INDEX api_keys_by_expiry")
c.commit()
c.close()
c = sqlite3.connect(db)
timed("without it")
print("SQLite", sqlite3.sqlite_version)
c.close()
remove()
