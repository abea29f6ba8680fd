"""Shared by the readers: Arrow rows as JSON lines, sorted, and errors.

Values: timestamps, dates and times as ISO 8601 strings (nanosecond
timestamps keep their nine digits), decimals as strings, binary as base64,
UUIDs as strings, maps as objects (keys as strings), NaN and infinities as
the strings "NaN", "Infinity", "-Infinity". Each object's keys are sorted,
and the lines are sorted by their text: the output of one table is the same
whatever the order of its files and row groups.
"""

import base64
import datetime
import decimal
import json
import math
import os
import sys
import uuid

import pyarrow as pa


def fail(prog, message, code=1):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def add_table_args(parser):
    """--uri (the REST catalog) and --table (namespace.table)."""
    parser.add_argument("--uri", default=os.environ.get("KEYSTONE_TESTBED_ICEBERG_URI"),
                        help="the REST catalog (default: $KEYSTONE_TESTBED_ICEBERG_URI)")
    parser.add_argument("--table", required=True, help="namespace.table")
    parser.add_argument("--endpoint", default=os.environ.get("KEYSTONE_TESTBED_S3_ENDPOINT"),
                        help="the S3 endpoint of s3:// warehouses (default: $KEYSTONE_TESTBED_S3_ENDPOINT)")


def rest_catalog(args, warehouse=None):
    """The REST catalog of --uri; its tables' s3:// files are read through
    --endpoint with $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY, else
    "keystone" (gofakes3 accepts any)."""
    from pyiceberg.catalog.rest import RestCatalog
    props = {"uri": args.uri}
    if warehouse:
        props["warehouse"] = warehouse
    if args.endpoint:
        props.update({
            "s3.endpoint": args.endpoint,
            "s3.access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", "keystone"),
            "s3.secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", "keystone"),
            "s3.region": os.environ.get("AWS_REGION", "us-east-1"),
            "s3.force-virtual-addressing": "false",
        })
    return RestCatalog("testbed", **props)


def check_table_args(parser, args):
    if not args.uri:
        parser.error("--uri is required (or set KEYSTONE_TESTBED_ICEBERG_URI)")
    if "." not in args.table:
        parser.error("--table must be namespace.table")


def require_lake_python(prog):
    """Fails naming the interpreter to use when pyiceberg is missing."""
    try:
        import pyiceberg  # noqa: F401
    except ImportError as e:
        fail(prog, f"{e}: run this with the testbed's $KEYSTONE_TESTBED_LAKE_PYTHON")


def _ns_iso(value, tz):
    # value: nanoseconds since the epoch (int). Python's datetime stops at
    # microseconds: format those, then put the nine digits back.
    seconds, nanos = divmod(value, 1_000_000_000)
    base = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)
    text = base.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}"
    if tz is not None:
        text += "+00:00"
    return text


def _plain(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # Arrow maps come out as lists of (key, value) pairs.
        if value and all(isinstance(x, tuple) and len(x) == 2 for x in value):
            return {str(_plain(k)): _plain(v) for k, v in value}
        return [_plain(x) for x in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _column_values(column):
    """A column's values as Python values, nanosecond timestamps as strings."""
    if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
        ints = column.cast(pa.int64()).to_pylist()
        return [None if v is None else _ns_iso(v, column.type.tz) for v in ints]
    if pa.types.is_map(column.type):
        # (key, value) pairs; an empty map must stay an object, not a list.
        return [None if v is None else {str(_plain(k)): x for k, x in v} for v in column.to_pylist()]
    return column.to_pylist()


def table_lines(table):
    """The rows of an Arrow table as sorted JSON lines."""
    names = table.column_names
    columns = [_column_values(table.column(i)) for i in range(table.num_columns)]
    lines = []
    for i in range(table.num_rows):
        row = {name: _plain(col[i]) for name, col in zip(names, columns)}
        lines.append(json.dumps(row, sort_keys=True, allow_nan=False, ensure_ascii=False))
    lines.sort()
    return lines


def print_lines(lines):
    out = sys.stdout
    for line in lines:
        out.write(line)
        out.write("\n")
    out.flush()


def dumps(obj):
    return json.dumps(_plain(obj), sort_keys=True, allow_nan=False, ensure_ascii=False)
