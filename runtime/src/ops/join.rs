//! `join` and `enrich`: stream-table lookups.
//!
//! The table holds the latest row per key (a compacted topic on Kafka, a JSON-lines
//! file in local mode: later lines replace earlier ones with the same key). An
//! event matches the row whose key fields (`table.key`, in order) equal the event's
//! `on` fields, compared by type and value (`"1"` does not match `1`).
//!
//! - The copied fields are `fields` (dotted paths in the row, a missing one is
//!   skipped) or, when empty, every top-level field of the row except the key
//!   fields. They are written under `into` (an object field, created or merged
//!   into) or, for a join without `into`, at the top level, replacing fields of the
//!   same name.
//! - No matching row: `join` with `kind: Inner` drops the event (counted);
//!   `kind: Left` and `enrich` pass it unchanged.
//!
//! The table is the operator's state: [`Table::apply`] takes a table-topic record
//! (key bytes as [`Table::row_key`] encodes them, value the row's JSON, `None` a
//! delete), and snapshots are the rows as such records.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::BufRead;
use std::path::Path;

use keystone_crds::ops::{EnrichSpec, JoinKind, JoinSpec, TableSpec};
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Object, Value};

use crate::error::RuntimeError;
use crate::event::{Event, FieldPath, encode_key, with_writes};
use crate::operator::{Ctx, Operator, Output};
use crate::state::{StateChange, StateError, hex};

/// The latest row per key of a table.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: String,
    key: Vec<FieldPath>,
    rows: HashMap<Vec<u8>, Row, BuildHasherDefault<KeyHasher>>,
}

/// A row: its JSON text (checked when the row arrived), the document parsed from
/// it when a look-up needs one, and the JSON text a join writes under its `into`
/// field for it, built on the row's first match (each join step has its own copy
/// of its table). Rows that are never matched, and rows only ever appended as
/// `into`, keep no document: a parsed document costs about ten times its text.
#[derive(Clone, Debug)]
struct Row {
    raw: Box<[u8]>,
    value: OnceCell<Value>,
    into_json: OnceCell<Box<[u8]>>,
}

impl Row {
    fn new(raw: Box<[u8]>, value: Option<Value>) -> Self {
        Self {
            raw,
            value: value.map(OnceCell::from).unwrap_or_default(),
            into_json: OnceCell::new(),
        }
    }

    fn parse(raw: &[u8]) -> Value {
        // The text was parsed when the row arrived: it is valid JSON.
        crate::event::reparse(raw).unwrap_or_default()
    }

    /// The row's document, parsed once and kept.
    fn value(&self) -> &Value {
        self.value.get_or_init(|| Self::parse(&self.raw))
    }

    /// Calls `f` with the row's document, without keeping one it had to parse.
    fn with_value<T>(&self, f: impl FnOnce(&Value) -> T) -> T {
        match self.value.get() {
            Some(value) => f(value),
            None => f(&Self::parse(&self.raw)),
        }
    }
}

/// Hashes key bytes with xxh3 (instead of SipHash): table keys come from the
/// table's own topic and the events, and the look-up is on every event's path.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = self.0.rotate_left(17) ^ xxhash_rust::xxh3::xxh3_64(bytes);
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = self.0.rotate_left(17) ^ n as u64;
    }
}

impl Table {
    pub fn new(spec: &TableSpec) -> Self {
        Self {
            name: spec.name.clone(),
            key: spec.key.iter().map(|k| FieldPath::new(k)).collect(),
            rows: HashMap::default(),
        }
    }

    /// The key bytes of a row; `Err` names the missing key field.
    pub fn row_key(&self, row: &Value) -> Result<Vec<u8>, String> {
        let mut key = Vec::new();
        encode_key(row, &self.key, &mut key)
            .map_err(|missing| format!("the row has no key field {:?}", missing.dotted))?;
        Ok(key)
    }

    /// Inserts or replaces a row by its key.
    pub fn upsert(&mut self, row: Value) -> Result<(), String> {
        if !row.is_object() {
            return Err("a row must be a JSON object".to_owned());
        }
        let key = self.row_key(&row)?;
        let raw = sonic_rs::to_vec(&row)
            .unwrap_or_default()
            .into_boxed_slice();
        self.rows.insert(key, Row::new(raw, Some(row)));
        Ok(())
    }

    /// Applies one table-topic record.
    pub fn apply(&mut self, change: StateChange) -> Result<(), StateError> {
        match change.value {
            None => {
                self.rows.remove(&change.key);
            }
            Some(bytes) => {
                crate::event::parse_value(&bytes).map_err(|reason| StateError::Value {
                    key: hex(&change.key),
                    message: format!("the row is not a document: {reason}"),
                })?;
                self.rows
                    .insert(change.key, Row::new(bytes.into_boxed_slice(), None));
            }
        }
        Ok(())
    }

    /// Reads rows from a JSON-lines file (blank lines skipped).
    pub fn load_jsonl(&mut self, path: &Path) -> Result<(), RuntimeError> {
        let file = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| RuntimeError::io(path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let table = self.name.clone();
            let error = |message: String| RuntimeError::Table {
                table: table.clone(),
                file: path.display().to_string(),
                line: index + 1,
                message,
            };
            let row: Value = crate::event::parse_value(line.as_bytes()).map_err(error)?;
            if !row.is_object() {
                return Err(error("a row must be a JSON object".to_owned()));
            }
            let key = self.row_key(&row).map_err(error)?;
            // Keep the text; the document is parsed again if a look-up needs it.
            drop(row);
            self.rows
                .insert(key, Row::new(line.into_bytes().into_boxed_slice(), None));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<&Value> {
        self.rows.get(key).map(Row::value)
    }
}

pub struct Join {
    table: Table,
    on: Vec<FieldPath>,
    fields: Vec<FieldPath>,
    into: Option<FieldPath>,
    /// `into` when it is a top-level field: a match whose event lacks that field
    /// gets the row's prepared JSON appended as the event's last member.
    into_top: Option<String>,
    /// Drop events without a row (inner join).
    inner: bool,
    kind: &'static str,
    key_buf: Vec<u8>,
    buf: Vec<u8>,
}

impl Join {
    /// A `join` step: inner or left as `spec.kind` says.
    pub fn inner_or_left(spec: &JoinSpec, table: Table) -> Self {
        Self::new(
            table,
            &spec.lookup_key,
            &spec.fields,
            spec.into.as_deref(),
            spec.kind == JoinKind::Inner,
            "join",
        )
    }

    /// An `enrich` step: a left join whose fields go under `spec.into`.
    pub fn left_into(spec: &EnrichSpec, table: Table) -> Self {
        Self::new(
            table,
            &spec.lookup_key,
            &spec.fields,
            Some(&spec.into),
            false,
            "enrich",
        )
    }

    fn new(
        table: Table,
        on: &[String],
        fields: &[String],
        into: Option<&str>,
        inner: bool,
        kind: &'static str,
    ) -> Self {
        Self {
            table,
            on: on.iter().map(|f| FieldPath::new(f)).collect(),
            fields: fields.iter().map(|f| FieldPath::new(f)).collect(),
            into: into.map(FieldPath::new),
            into_top: into.filter(|i| !i.contains('.')).map(str::to_owned),
            inner,
            kind,
            key_buf: Vec::with_capacity(64),
            buf: Vec::with_capacity(512),
        }
    }

    pub fn table_mut(&mut self) -> &mut Table {
        &mut self.table
    }

    /// The fields to write into a matching event: (path in the event, value).
    fn writes_for(
        fields: &[FieldPath],
        into: Option<&FieldPath>,
        table_key: &[FieldPath],
        row: &Value,
    ) -> Vec<(FieldPath, Value)> {
        let target = |name: &str| match into {
            Some(into) => FieldPath::new(&format!("{}.{name}", into.dotted)),
            None => FieldPath::new(name),
        };
        let mut writes = Vec::new();
        if fields.is_empty() {
            if let Some(object) = row.as_object() {
                for (name, value) in object.iter() {
                    if table_key.iter().any(|k| k.dotted == name) {
                        continue;
                    }
                    writes.push((target(name), value.clone()));
                }
            }
        } else {
            for field in fields {
                if let Some(value) = field.get(row) {
                    writes.push((target(&field.dotted), value.clone()));
                }
            }
        }
        if writes.is_empty()
            && let Some(into) = into
        {
            // A matching row with nothing to copy still marks the match.
            writes.push((into.clone(), Value::from(Object::new())));
        }
        writes
    }

    /// The JSON text of the value the writes for `row` give the top-level field
    /// `into` of an event that has no such field: the same value as the general
    /// path builds, computed once per row.
    fn into_json(
        fields: &[FieldPath],
        into: &FieldPath,
        into_top: &str,
        table_key: &[FieldPath],
        row: &Value,
    ) -> Box<[u8]> {
        // Named top-level fields, each once: the object of those the row has, in
        // the order named (what the merge below gives, without building paths).
        let plain = !fields.is_empty()
            && fields.iter().enumerate().all(|(i, f)| {
                !f.dotted.contains('.') && fields[..i].iter().all(|g| g.dotted != f.dotted)
            });
        if plain {
            let mut out = vec![b'{'];
            for field in fields {
                if let Some(value) = row.get(field.dotted.as_str()) {
                    if out.len() > 1 {
                        out.push(b',');
                    }
                    let _ = sonic_rs::to_writer(&mut out, field.dotted.as_str());
                    out.push(b':');
                    let _ = sonic_rs::to_writer(&mut out, value);
                }
            }
            out.push(b'}');
            return out.into_boxed_slice();
        }
        let mut writes = Self::writes_for(fields, Some(into), table_key, row);
        let refs: Vec<(&FieldPath, Value)> =
            writes.iter_mut().map(|(p, v)| (&*p, v.take())).collect();
        let merged = with_writes(&Value::from(Object::new()), &refs, &mut Vec::new());
        let value = merged.get(into_top).cloned().unwrap_or_default();
        sonic_rs::to_vec(&value)
            .unwrap_or_default()
            .into_boxed_slice()
    }
}

impl Operator for Join {
    fn process(&mut self, mut event: Event, _ctx: &Ctx, out: &mut Output) {
        self.key_buf.clear();
        if let Err(missing) = encode_key(&event.value, &self.on, &mut self.key_buf) {
            let reason = format!(
                "{}: missing field {:?} to look up table {:?}",
                self.kind, missing.dotted, self.table.name
            );
            return out.dead_letter(event, reason);
        }
        let Some(row) = self.table.rows.get(&self.key_buf) else {
            return if self.inner {
                out.drop_event(event)
            } else {
                out.emit(event)
            };
        };
        if let (Some(into), Some(into_top)) = (&self.into, &self.into_top)
            && event.value.get(into_top.as_str()).is_none()
        {
            // The common case: append `"into":{...}` to the serialized event,
            // instead of merging member by member.
            let json = row.into_json.get_or_init(|| {
                row.with_value(|value| {
                    Self::into_json(&self.fields, into, into_top, &self.table.key, value)
                })
            });
            self.buf.clear();
            let _ = sonic_rs::to_writer(&mut self.buf, &event.value);
            if self.buf.pop() == Some(b'}') {
                if self.buf.len() > 1 {
                    self.buf.push(b',');
                }
                let _ = sonic_rs::to_writer(&mut self.buf, into_top.as_str());
                self.buf.push(b':');
                self.buf.extend_from_slice(json);
                self.buf.push(b'}');
                if let Some(value) = crate::event::reparse(&self.buf) {
                    event.value = value;
                    return out.emit(event);
                }
            }
        }
        let mut writes = Self::writes_for(
            &self.fields,
            self.into.as_ref(),
            &self.table.key,
            row.value(),
        );
        let refs: Vec<(&FieldPath, Value)> =
            writes.iter_mut().map(|(p, v)| (&*p, v.take())).collect();
        event.value = with_writes(&event.value, &refs, &mut self.buf);
        out.emit(event);
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<StateChange> {
        let mut records: Vec<StateChange> = self
            .table
            .rows
            .iter()
            .map(|(key, row)| {
                StateChange::upsert(
                    key.clone(),
                    sonic_rs::to_vec(row.value()).unwrap_or_default(),
                )
            })
            .collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    fn restore(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        self.table.rows.clear();
        for change in changes {
            self.table.apply(change)?;
        }
        Ok(())
    }

    fn update_table(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        for change in changes {
            self.table.apply(change)?;
        }
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{events, run, run_split};
    use keystone_crds::schema::SchemaSpec;

    fn table() -> Table {
        let mut table = Table::new(&TableSpec {
            name: "customers".into(),
            topic: "customers".into(),
            cluster: None,
            key: vec!["id".into()],
            schema: SchemaSpec::default(),
            replicated: false,
        });
        for row in [
            r#"{"id":1,"name":"Ann","tier":"gold"}"#,
            r#"{"id":2,"name":"Bob","tier":"silver"}"#,
            r#"{"id":2,"name":"Bob","tier":"gold"}"#,
        ] {
            table.upsert(sonic_rs::from_str(row).unwrap()).unwrap();
        }
        table
    }

    fn join_spec(kind: JoinKind, fields: &[&str], into: Option<&str>) -> JoinSpec {
        JoinSpec {
            table: TableSpec {
                name: "customers".into(),
                topic: "customers".into(),
                cluster: None,
                key: vec!["id".into()],
                schema: SchemaSpec::default(),
                replicated: false,
            },
            lookup_key: vec!["customer_id".into()],
            kind,
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            into: into.map(str::to_owned),
        }
    }

    const INPUT: [&str; 3] = [
        r#"{"order":1,"customer_id":1}"#,
        r#"{"order":2,"customer_id":3}"#,
        r#"{"order":3,"customer_id":2}"#,
    ];

    #[test]
    fn inner_join_drops_unmatched_and_copies_top_level() {
        let mut op = Join::inner_or_left(&join_spec(JoinKind::Inner, &[], None), table());
        let out = run(&mut op, events(&INPUT));
        assert_eq!(
            out.json(),
            vec![
                r#"{"customer_id":1,"name":"Ann","order":1,"tier":"gold"}"#,
                r#"{"customer_id":2,"name":"Bob","order":3,"tier":"gold"}"#,
            ]
        );
        assert_eq!(out.dropped, 1);
    }

    #[test]
    fn left_join_into_keeps_unmatched() {
        let mut op = Join::inner_or_left(
            &join_spec(JoinKind::Left, &["tier"], Some("customer")),
            table(),
        );
        let out = run(&mut op, events(&INPUT));
        assert_eq!(
            out.json(),
            vec![
                r#"{"customer":{"tier":"gold"},"customer_id":1,"order":1}"#,
                r#"{"customer_id":3,"order":2}"#,
                r#"{"customer":{"tier":"gold"},"customer_id":2,"order":3}"#,
            ]
        );
    }

    #[test]
    fn appended_into_matches_the_merge() {
        // `into` absent from the event: appended as the last member (fast path);
        // present: merged into (general path). Both in the row's field order.
        let mut op =
            Join::inner_or_left(&join_spec(JoinKind::Inner, &[], Some("customer")), table());
        let out = run(
            &mut op,
            events(&[
                r#"{"order":1,"customer_id":1}"#,
                r#"{"customer":{"vip":true},"customer_id":2}"#,
                r#"{"customer_id":1,"note":"again"}"#,
                r#"{}"#,
            ]),
        );
        assert_eq!(
            out.json(),
            vec![
                r#"{"customer":{"name":"Ann","tier":"gold"},"customer_id":1,"order":1}"#,
                r#"{"customer":{"name":"Bob","tier":"gold","vip":true},"customer_id":2}"#,
                r#"{"customer":{"name":"Ann","tier":"gold"},"customer_id":1,"note":"again"}"#,
            ]
        );
        assert_eq!(out.dead.len(), 1);
        for (fields, expected) in [
            (
                &["tier", "nope", "name"][..],
                r#"{"customer_id":1,"c":{"tier":"gold","name":"Ann"}}"#,
            ),
            (
                &["name", "name"][..],
                r#"{"customer_id":1,"c":{"name":"Ann"}}"#,
            ),
            (&["nope"][..], r#"{"customer_id":1,"c":{}}"#),
        ] {
            let mut op =
                Join::inner_or_left(&join_spec(JoinKind::Inner, fields, Some("c")), table());
            let mut out = Output::new("j", false);
            op.process(
                events(&[r#"{"customer_id":1}"#]).remove(0),
                &Ctx { now_ms: 0 },
                &mut out,
            );
            let mut line = Vec::new();
            for event in out.take_events() {
                event.write_json_line(&mut line);
            }
            assert_eq!(String::from_utf8(line).unwrap().trim_end(), expected);
        }
    }

    #[test]
    fn keys_are_typed() {
        let mut op = Join::inner_or_left(&join_spec(JoinKind::Inner, &[], None), table());
        let out = run(&mut op, events(&[r#"{"customer_id":"1"}"#]));
        assert_eq!(out.dropped, 1);
    }

    #[test]
    fn table_state_restores() {
        let (whole, resumed) = run_split(
            || Join::inner_or_left(&join_spec(JoinKind::Inner, &["name"], Some("c")), table()),
            &INPUT,
            1,
        );
        assert_eq!(whole, resumed);
        let mut op = Join::inner_or_left(&join_spec(JoinKind::Inner, &[], None), table());
        let snapshot = op.snapshot();
        assert_eq!(snapshot.len(), 2);
        let mut fresh = Join::inner_or_left(
            &join_spec(JoinKind::Inner, &[], None),
            Table::new(&join_spec(JoinKind::Inner, &[], None).table),
        );
        fresh.restore(snapshot).unwrap();
        assert_eq!(fresh.state_entries(), 2);
        let key = op
            .table
            .row_key(&sonic_rs::from_str(r#"{"id":1}"#).unwrap())
            .unwrap();
        op.table_mut().apply(StateChange::delete(key)).unwrap();
        assert_eq!(op.state_entries(), 1);
    }
}
