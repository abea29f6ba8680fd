#!/usr/bin/env python3
"""Makes or drops an Iceberg table through a REST catalog with pyiceberg, as a
team's own tooling would: the tests' tables that Keystone did not create.

    iceberg_table.py --table shop.orders --create id:string:required amount:string
        creates the namespace if missing and the table with these columns
        (name:type[:required]; types string, long, double, boolean, timestamptz)
    iceberg_table.py --table shop.orders --drop
        drops the table (and its data), if it exists

Run it with the testbed's virtualenv ($KEYSTONE_TESTBED_LAKE_PYTHON).
--uri defaults to $KEYSTONE_TESTBED_ICEBERG_URI. Exits 1 with a message on
stderr on any error, 2 on bad arguments.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lakejson  # noqa: E402

PROG = "iceberg_table"


def parse_args():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    lakejson.add_table_args(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--create", nargs="+", metavar="NAME:TYPE[:required]")
    mode.add_argument("--drop", action="store_true")
    args = p.parse_args()
    lakejson.check_table_args(p, args)
    return args


def schema_of(specs):
    from pyiceberg import types
    from pyiceberg.schema import Schema
    kinds = {
        "string": types.StringType, "long": types.LongType, "double": types.DoubleType,
        "boolean": types.BooleanType, "timestamptz": types.TimestamptzType,
    }
    fields = []
    for field_id, spec in enumerate(specs, start=1):
        name, kind, *rest = spec.split(":")
        if kind not in kinds or rest not in ([], ["required"]):
            lakejson.fail(PROG, f"bad column {spec!r}: name:type[:required], type one of {sorted(kinds)}")
        fields.append(types.NestedField(field_id, name, kinds[kind](), required=rest == ["required"]))
    return Schema(*fields)


def main():
    args = parse_args()
    lakejson.require_lake_python(PROG)
    from pyiceberg.exceptions import NoSuchTableError
    try:
        catalog = lakejson.rest_catalog(args)
        if args.drop:
            try:
                catalog.purge_table(args.table)
            except NoSuchTableError:
                pass
        else:
            namespace = args.table.rsplit(".", 1)[0]
            catalog.create_namespace_if_not_exists(namespace)
            catalog.create_table(args.table, schema=schema_of(args.create))
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        lakejson.fail(PROG, f"{'dropping' if args.drop else 'creating'} {args.table} at {args.uri} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
