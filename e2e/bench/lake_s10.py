#!/usr/bin/env python3
"""S10's Parquet helpers, run with the testbed's lake Python
($KEYSTONE_TESTBED_LAKE_PYTHON: pyarrow). Python because pyarrow is the
reference Parquet writer the sink is compared with, and reads the footers.

    lake_s10.py ceiling --input events.jsonl --out DIR
        the pyarrow writer's ceiling: the events' five S10 fields (event_id,
        ts, user_id, amount, country) as an Arrow table, built before the
        clock starts; then timed: write_to_dataset into DIR, Hive folders by
        country, zstd level 1 (the sink's codec). Prints
        {"rows": N, "seconds": S}.
    lake_s10.py watch --dir DIR --expected N --pid PID [--timeout S]
        polls DIR every 50 ms for published Parquet files (names starting
        with "_" or "." are skipped, as pyarrow.dataset skips them), reads
        each new file's row count from its footer, and prints
        {"first_s", "first_rows", "done_s", "rows", "files"} (epoch seconds:
        the poll that first saw files, the rows it saw, the poll that saw N
        rows) once N rows are there, PID has exited or the timeout passed
        (done_s null then).
"""

import argparse
import json
import os
import sys
import time


def ceiling(args):
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    table = pj.read_json(args.input)
    table = table.select(["event_id", "ts", "user_id", "amount", "country"])
    table = table.cast(pa.schema([
        ("event_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.string()),
        ("amount", pa.float64()), ("country", pa.string()),
    ]))
    start = time.perf_counter()
    pq.write_to_dataset(table, root_path=args.out, partition_cols=["country"],
                        compression="zstd", compression_level=1)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": table.num_rows, "seconds": seconds}))


def published(root):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for f in files:
            if not f.startswith(("_", ".")):
                yield os.path.join(folder, f)


def alive(pid):
    return os.path.exists(f"/proc/{pid}")


def watch(args):
    import pyarrow.parquet as pq

    seen = {}
    first_s = first_rows = done_s = None
    deadline = time.time() + args.timeout
    while True:
        now = time.time()
        if os.path.isdir(args.dir):
            for path in published(args.dir):
                if path not in seen:
                    seen[path] = pq.read_metadata(path).num_rows
        rows = sum(seen.values())
        if seen and first_s is None:
            first_s, first_rows = now, rows
        if rows >= args.expected:
            done_s = now
            break
        if not alive(args.pid) or now > deadline:
            break
        time.sleep(0.05)
    print(json.dumps({"first_s": first_s, "first_rows": first_rows, "done_s": done_s,
                      "rows": sum(seen.values()), "files": len(seen)}))


def main():
    p = argparse.ArgumentParser(prog="lake_s10")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ceiling")
    c.add_argument("--input", required=True)
    c.add_argument("--out", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--dir", required=True)
    w.add_argument("--expected", type=int, required=True)
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    (ceiling if args.cmd == "ceiling" else watch)(args)


if __name__ == "__main__":
    sys.exit(main())
