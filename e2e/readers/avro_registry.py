#!/usr/bin/env python3
"""An independent Avro producer and reader with a schema registry (confluent-kafka).

    avro_registry.py serialize --registry URL --topic T --schema-file F [--key]
        reads JSON values, one per line, on stdin and prints each serialized
        record as hex, one per line: the Confluent wire format (magic byte 0,
        the schema id as 4 bytes big-endian, the Avro binary body) made by
        confluent_kafka.schema_registry.avro.AvroSerializer with
        auto.register.schemas true and the TopicNameStrategy (the subject is
        T-value, or T-key with --key); the schema (F, Avro schema JSON) is
        registered under it when the registry does not have it yet.
    avro_registry.py deserialize --registry URL --topic T [--key]
        reads hex records, one per line, on stdin and prints each value as
        one JSON object per line, in input order, keys sorted: AvroDeserializer
        without a reader schema (the writer's schema, by the record's id). An
        empty line (a tombstone) prints null.

--registry defaults to $KEYSTONE_TESTBED_REGISTRY_URL (the testbed's
Confluent-compatible API, http://127.0.0.1:PORT/apis/ccompat/v7). Run it with
the testbed's virtualenv ($KEYSTONE_TESTBED_LAKE_PYTHON).

Values, both ways (serialize reads what deserialize prints): decimals as
strings, timestamps as RFC 3339 strings (timestamp-millis/micros come out in
UTC with "+00:00"; local-timestamp-* without an offset), dates and times as
ISO 8601 strings, bytes and fixed as base64, UUIDs as strings, NaN and the
infinities as "NaN", "Infinity", "-Infinity". On input, a union's branch is
the first one the JSON value is naturally (null, boolean, number, a string
for string or one of an enum's symbols, an object for a record whose fields
it names or a map, an array), else the first one it converts to; timestamps,
dates and times may also be given as their Avro numbers.

    avro_registry.py write-container --schema-file F FILE
        reads JSON values on stdin (as serialize does) and writes them to the
        Avro container file FILE with fastavro (deflate blocks).
    avro_registry.py read-container FILE
        prints the records of the Avro container file FILE as JSON lines (as
        deserialize does).

Exits 1 with "avro_registry: error: ..." on stderr on any failure (a bad
line names its number), 2 on bad arguments.
"""

import argparse
import base64
import datetime
import decimal
import json
import math
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lakejson  # noqa: E402

PROG = "avro_registry"


def fail(message, code=1):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


# ------------------------------------------------------------- JSON -> Avro

_NUMBER_TYPES = {"int", "long", "float", "double"}


class _Converter:
    """JSON values to the Python values fastavro writes, driven by the schema."""

    def __init__(self, named):
        self.named = named  # full name -> parsed schema (fastavro.parse_schema)

    def resolve(self, schema):
        if isinstance(schema, str) and schema in self.named:
            return self.named[schema]
        return schema

    def convert(self, schema, value):
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return self.union(schema, value)
        if isinstance(schema, str):
            return self.primitive(schema, value)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if value is None:
            return None
        if logical == "decimal" and kind in ("bytes", "fixed"):
            if isinstance(value, (str, int, float)):
                return decimal.Decimal(str(value))
            return value
        if logical in ("timestamp-millis", "timestamp-micros", "timestamp-nanos",
                       "local-timestamp-millis", "local-timestamp-micros", "local-timestamp-nanos"):
            if isinstance(value, str):
                parsed = datetime.datetime.fromisoformat(value)
                if logical.startswith("timestamp") and parsed.tzinfo is None:
                    raise ValueError(f"timestamp {value!r} has no UTC offset")
                return parsed
            return value
        if logical == "date" and isinstance(value, str):
            return datetime.date.fromisoformat(value)
        if logical in ("time-millis", "time-micros") and isinstance(value, str):
            return datetime.time.fromisoformat(value)
        if logical == "uuid" and isinstance(value, str):
            return uuid.UUID(value)
        if kind == "record" or kind == "error":
            if not isinstance(value, dict):
                raise ValueError(f"record {schema.get('name')} needs a JSON object, got {value!r}")
            fields = {f["name"]: f for f in schema["fields"]}
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise ValueError(f"record {schema.get('name')} has no field(s) {', '.join(unknown)}")
            return {k: self.convert(fields[k]["type"], v) for k, v in value.items()}
        if kind == "enum":
            return value
        if kind == "array":
            if not isinstance(value, list):
                raise ValueError(f"an array needs a JSON array, got {value!r}")
            return [self.convert(schema["items"], v) for v in value]
        if kind == "map":
            if not isinstance(value, dict):
                raise ValueError(f"a map needs a JSON object, got {value!r}")
            return {k: self.convert(schema["values"], v) for k, v in value.items()}
        if kind == "fixed":
            return _b64(value)
        return self.primitive(kind, value)

    def primitive(self, kind, value):
        if value is None:
            return None
        if kind == "bytes":
            return _b64(value)
        if kind in ("float", "double") and isinstance(value, str):
            special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
            if value in special:
                return special[value]
        if kind in ("float", "double") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def natural(self, schema, value):
        """Whether VALUE is naturally of this union branch."""
        schema = self.resolve(schema)
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = None if isinstance(schema, str) else schema.get("logicalType")
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return kind == "boolean"
        if isinstance(value, int):
            return kind in _NUMBER_TYPES and logical is None
        if isinstance(value, float):
            return kind in ("float", "double")
        if isinstance(value, str):
            if kind == "string":
                return logical is None
            return kind == "enum" and value in schema["symbols"]
        if isinstance(value, list):
            return kind == "array"
        if isinstance(value, dict):
            if kind in ("record", "error"):
                return set(value) <= {f["name"] for f in schema["fields"]}
            return kind == "map"
        return False

    def union(self, branches, value):
        for branch in branches:
            if self.natural(branch, value):
                return self.convert(branch, value)
        errors = []
        for branch in branches:
            if self.resolve(branch) == "null":
                continue
            try:
                converted = self.convert(branch, value)
            except (ValueError, TypeError, KeyError, decimal.InvalidOperation) as e:
                errors.append(str(e))
                continue
            if converted is not None:
                return converted
        raise ValueError(f"{value!r} fits no branch of the union {json.dumps(_names(branches))}"
                         + (f" ({'; '.join(errors)})" if errors else ""))


def _names(branches):
    out = []
    for b in branches:
        if isinstance(b, dict):
            out.append(b.get("name") or b.get("logicalType") or b["type"])
        else:
            out.append(b)
    return out


def _b64(value):
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"bytes need a base64 string, got {value!r}")


# ------------------------------------------------------------- Avro -> JSON

# The same JSON as the lake readers print (lakejson.dumps): decimals as
# strings, timestamps ISO 8601, bytes base64, keys sorted.
dumps = lakejson.dumps


# ------------------------------------------------------------------ commands

def parse_args():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write-container")
    w.add_argument("--schema-file", required=True, help="the file's Avro schema (JSON)")
    w.add_argument("file", help="the Avro container file to write")
    r = sub.add_parser("read-container")
    r.add_argument("file", help="the Avro container file to read")
    for mode in ("serialize", "deserialize"):
        s = sub.add_parser(mode)
        s.add_argument("--registry", default=os.environ.get("KEYSTONE_TESTBED_REGISTRY_URL"),
                       help="the registry's Confluent-compatible API (default: $KEYSTONE_TESTBED_REGISTRY_URL)")
        s.add_argument("--topic", required=True, help="the topic (subject TOPIC-value, or TOPIC-key with --key)")
        s.add_argument("--key", action="store_true", help="the record key's subject instead of the value's")
        if mode == "serialize":
            s.add_argument("--schema-file", required=True, help="the writer's Avro schema (JSON)")
    args = p.parse_args()
    if args.mode in ("write-container", "read-container"):
        return args
    if not args.registry:
        p.error("--registry is required (or set KEYSTONE_TESTBED_REGISTRY_URL)")
    return args


def main():
    args = parse_args()
    try:
        import fastavro
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext
    except ImportError as e:
        fail(f"{e}: run this with the testbed's $KEYSTONE_TESTBED_LAKE_PYTHON")

    if args.mode in ("write-container", "read-container"):
        containers(args, fastavro)
        return
    # httpx waits for ever by default; a request Apicurio leaves unanswered
    # (seen now and then, just after its 404 for an `associations` lookup) is
    # then retried by the client (timeouts are among its retriable errors).
    client = SchemaRegistryClient({"url": args.registry, "timeout": 10})
    ctx = SerializationContext(args.topic, MessageField.KEY if args.key else MessageField.VALUE)
    out = sys.stdout
    n = 0
    try:
        if args.mode == "serialize":
            with open(args.schema_file, encoding="utf-8") as f:
                schema_str = f.read()
            named = {}
            parsed = fastavro.parse_schema(json.loads(schema_str), named_schemas=named)
            converter = _Converter(named)
            serializer = AvroSerializer(client, schema_str, conf={"auto.register.schemas": True})
            for n, line in enumerate(sys.stdin, 1):
                if not line.strip():
                    continue
                value = converter.convert(parsed, json.loads(line))
                out.write(serializer(value, ctx).hex())
                out.write("\n")
        else:
            deserializer = AvroDeserializer(client)
            for n, line in enumerate(sys.stdin, 1):
                text = line.strip()
                value = deserializer(bytes.fromhex(text), ctx) if text else None
                out.write(dumps(value))
                out.write("\n")
        out.flush()
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        where = f"line {n}: " if n else ""
        fail(f"{where}{type(e).__name__}: {e}")


def containers(args, fastavro):
    """Avro container files with fastavro: JSON lines on stdin into a file
    (deflate blocks), or a file's records out as JSON lines."""
    n = 0
    try:
        if args.mode == "write-container":
            with open(args.schema_file, encoding="utf-8") as f:
                named = {}
                parsed = fastavro.parse_schema(json.load(f), named_schemas=named)
            converter = _Converter(named)
            records = []
            for n, line in enumerate(sys.stdin, 1):
                if line.strip():
                    records.append(converter.convert(parsed, json.loads(line)))
            with open(args.file, "wb") as out:
                fastavro.writer(out, parsed, records, codec="deflate")
        else:
            with open(args.file, "rb") as f:
                for n, record in enumerate(fastavro.reader(f), 1):
                    sys.stdout.write(dumps(record))
                    sys.stdout.write("\n")
            sys.stdout.flush()
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        where = f"line {n}: " if n else ""
        fail(f"{where}{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
