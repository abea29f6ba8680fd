#!/usr/bin/env python3
"""An independent reader of an Iceberg table, through a REST catalog (pyiceberg).

    read_iceberg.py --uri http://127.0.0.1:19181 --table shop.orders
        the table's current rows, one JSON object per line, sorted
    ... --snapshots
        one JSON object per snapshot, in commit order: snapshot_id,
        parent_snapshot_id, sequence_number, timestamp_ms, schema_id,
        current (the table's current snapshot), operation, summary (the
        summary's properties: added-records, total-records, ...)
    ... --files
        one JSON object per data file of the current snapshot: file_path,
        partition, record_count, file_size_in_bytes, spec_id, content
    ... --snapshot-id N     read the table as of snapshot N
    ... --filter EXPR       a pyiceberg row filter, e.g. "id >= 10 and region = 'eu'"

Run it with the testbed's virtualenv ($KEYSTONE_TESTBED_LAKE_PYTHON).
--uri defaults to $KEYSTONE_TESTBED_ICEBERG_URI; the files of an s3://
warehouse are read through --endpoint (default $KEYSTONE_TESTBED_S3_ENDPOINT). Value encoding: see
lakejson.py (timestamps as ISO strings). Exits 1 with a message on stderr
on any error (unknown table, catalog down), 2 on bad arguments.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lakejson  # noqa: E402

PROG = "read_iceberg"


def parse_args():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    lakejson.add_table_args(p)
    p.add_argument("--warehouse", default=None, help="the catalog's warehouse, if it needs one")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--snapshots", action="store_true", help="print the snapshots instead of the rows")
    mode.add_argument("--files", action="store_true", help="print the data files instead of the rows")
    p.add_argument("--snapshot-id", type=int, default=None, help="read the rows as of this snapshot")
    p.add_argument("--filter", default=None, help="a pyiceberg row filter expression")
    args = p.parse_args()
    lakejson.check_table_args(p, args)
    return args


def snapshot_lines(table):
    current = table.current_snapshot()
    current_id = current.snapshot_id if current is not None else None
    snaps = sorted(table.snapshots(), key=lambda s: (s.sequence_number or 0, s.timestamp_ms, s.snapshot_id))
    lines = []
    for s in snaps:
        summary = s.summary
        props = dict(summary.additional_properties) if summary is not None else {}
        op = summary.operation.value if summary is not None else None
        lines.append(lakejson.dumps({
            "snapshot_id": s.snapshot_id,
            "parent_snapshot_id": s.parent_snapshot_id,
            "sequence_number": s.sequence_number,
            "timestamp_ms": s.timestamp_ms,
            "schema_id": s.schema_id,
            "current": s.snapshot_id == current_id,
            "operation": op,
            "summary": props,
        }))
    return lines


def file_lines(table):
    files = table.inspect.files()
    wanted = ["content", "file_path", "file_format", "spec_id", "partition",
              "record_count", "file_size_in_bytes"]
    files = files.select([c for c in wanted if c in files.column_names])
    return lakejson.table_lines(files)


def main():
    args = parse_args()
    lakejson.require_lake_python(PROG)
    from pyiceberg.exceptions import NoSuchTableError, NoSuchNamespaceError
    try:
        catalog = lakejson.rest_catalog(args, args.warehouse)
        table = catalog.load_table(args.table)
        if args.snapshots:
            lines = snapshot_lines(table)
        elif args.files:
            lines = file_lines(table)
        else:
            if args.snapshot_id is not None and table.snapshot_by_id(args.snapshot_id) is None:
                lakejson.fail(PROG, f"table {args.table} has no snapshot {args.snapshot_id}")
            scan_args = {}
            if args.filter:
                scan_args["row_filter"] = args.filter
            if args.snapshot_id is not None:
                scan_args["snapshot_id"] = args.snapshot_id
            lines = lakejson.table_lines(table.scan(**scan_args).to_arrow())
    except (NoSuchTableError, NoSuchNamespaceError) as e:
        lakejson.fail(PROG, f"no table {args.table} in the catalog at {args.uri}: {e}")
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        lakejson.fail(PROG, f"reading {args.table} from {args.uri} failed: {type(e).__name__}: {e}")
    lakejson.print_lines(lines)


if __name__ == "__main__":
    main()
