#!/usr/bin/env python3
"""An independent reader of a Hive-style partitioned Parquet dataset (pyarrow).

    read_parquet.py --path s3://keystone/orders [--endpoint http://127.0.0.1:19900]
    read_parquet.py --path /some/local/dir
        the rows, partition columns (dt=2024-01-01/ folders) included, one
        JSON object per line, sorted
    ... --list
        the files under the path instead, one JSON object per line sorted by
        key: key (relative to --path, e.g. "dt=2024-01-01/part-0.parquet",
        "_SUCCESS", "_staging/..."), size, uri; every file, including the
        ones the row reading ignores; nothing (exit 0) when there is none
    ... --partition-strings
        partition values as strings (default: pyarrow's inference, int32
        when every value of a column is an integer, else string)

Row reading follows pyarrow.dataset: files and folders whose names start
with "_" or "." (_SUCCESS, _staging/) are ignored; every other file must be
Parquet. "__HIVE_DEFAULT_PARTITION__" reads as null; partition values are
URI-decoded.

S3: the endpoint defaults to $KEYSTONE_TESTBED_S3_ENDPOINT; the keys to
$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY, else "keystone" (gofakes3
accepts any). Run it with the testbed's virtualenv
($KEYSTONE_TESTBED_LAKE_PYTHON). Value encoding: see lakejson.py. Exits 1
with a message on stderr on any error (including a path with no files), 2
on bad arguments.
"""

import argparse
import os
import sys
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lakejson  # noqa: E402

PROG = "read_parquet"


def parse_args():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="s3://bucket/prefix or a local folder")
    p.add_argument("--endpoint", default=os.environ.get("KEYSTONE_TESTBED_S3_ENDPOINT"),
                   help="the S3 endpoint, http://host:port (default: $KEYSTONE_TESTBED_S3_ENDPOINT)")
    p.add_argument("--list", action="store_true", help="print the files' keys instead of the rows")
    p.add_argument("--partition-strings", action="store_true", help="read partition values as strings")
    args = p.parse_args()
    if args.path.startswith("s3://"):
        if not args.endpoint:
            p.error("an s3:// path needs --endpoint (or KEYSTONE_TESTBED_S3_ENDPOINT)")
        if not urlparse(args.path).netloc:
            p.error("an s3:// path needs a bucket: s3://bucket/prefix")
    elif "://" in args.path:
        p.error("--path takes s3://bucket/prefix or a local folder")
    return args


def filesystem(args):
    """(filesystem, base path in it, URI prefix for --list)."""
    import pyarrow.fs as pafs

    if not args.path.startswith("s3://"):
        base = os.path.abspath(args.path)
        return pafs.LocalFileSystem(), base, "file://" + base
    # No instance metadata lookups for credentials or the region.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = urlparse(args.endpoint)
    if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
        lakejson.fail(PROG, f"--endpoint must be http(s)://host:port, not {args.endpoint!r}", 2)
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID", "keystone"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "keystone"),
        region=os.environ.get("AWS_REGION", "us-east-1"),
        force_virtual_addressing=False,
    )
    base = args.path[len("s3://"):].rstrip("/")
    return fs, base, "s3://" + base


def list_lines(fs, base, uri):
    import pyarrow.fs as pafs

    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [lakejson.dumps({"key": os.path.basename(base), "size": info.size, "uri": uri})]
    # A prefix with no objects (never written, or emptied) lists nothing.
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    lines = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        key = i.path[len(base):].lstrip("/")
        lines.append(lakejson.dumps({"key": key, "size": i.size, "uri": f"{uri}/{key}"}))
    lines.sort()
    return lines


def row_lines(fs, base, uri, partition_strings):
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        lakejson.fail(PROG, f"nothing at {uri}")
    dataset = ds.dataset(base, filesystem=fs, format="parquet", partitioning="hive")
    if partition_strings:
        discovered = dataset.partitioning
        names = discovered.schema.names if discovered is not None else []
        if names:
            schema = pa.schema([(n, pa.string()) for n in names])
            dataset = ds.dataset(base, filesystem=fs, format="parquet",
                                 partitioning=ds.partitioning(schema, flavor="hive"))
    if not dataset.files:
        lakejson.fail(PROG, f"no data files at {uri} (files starting with _ or . are ignored)")
    return lakejson.table_lines(dataset.to_table())


def main():
    args = parse_args()
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        lakejson.fail(PROG, f"{e}: run this with the testbed's $KEYSTONE_TESTBED_LAKE_PYTHON")
    try:
        fs, base, uri = filesystem(args)
        if args.list:
            lines = list_lines(fs, base, uri)
        else:
            lines = row_lines(fs, base, uri, args.partition_strings)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        lakejson.fail(PROG, f"reading {args.path} failed: {type(e).__name__}: {e}")
    lakejson.print_lines(lines)


if __name__ == "__main__":
    main()
