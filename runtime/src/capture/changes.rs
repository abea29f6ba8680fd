//! Row changes decoded from `pgoutput`, and the net change of each row in a
//! transaction.
//!
//! A transaction's changes are delivered after it commits and are all ordered
//! by its commit LSN. Two changes of one row in one transaction would share
//! that sequence, so a downstream `order` step or a search index's external
//! version could not tell which is last. Other transactions never saw the
//! states in between, so Keystone emits one event per row per transaction: its
//! net change (an insert then an update is an insert of the final row; an
//! insert then a delete is nothing).

use std::collections::HashMap;
use std::sync::Arc;

use pg_walstream::{ColumnData, TupleData};
use serde_json::Value;

use crate::capture::values::{DecimalHandling, to_json};

/// A captured table, as `schema.name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl TableName {
    /// `schema.name`, or `name` in `public`.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(format!("{text:?} is not a table name (schema.table)"));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A column of a captured table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: Arc<str>,
    pub type_oid: u32,
}

/// A table as the log describes it (a `pgoutput` Relation message), with the
/// positions of its primary key's columns, in the key's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub table: Arc<TableName>,
    pub columns: Vec<Column>,
    pub key: Vec<usize>,
}

impl Relation {
    /// Places the primary key's columns (named by the catalog) among the
    /// relation's columns.
    pub fn new(
        table: Arc<TableName>,
        columns: Vec<Column>,
        primary_key: &[String],
    ) -> Result<Relation, String> {
        let key = primary_key
            .iter()
            .map(|name| {
                columns
                    .iter()
                    .position(|c| &*c.name == name)
                    .ok_or_else(|| {
                        format!(
                            "{table}: primary key column {name:?} is not among the table's columns"
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Relation {
            table,
            columns,
            key,
        })
    }

    /// Decodes a tuple's text values.
    pub fn decode(&self, tuple: &TupleData, decimals: DecimalHandling) -> Result<Row, String> {
        if tuple.column_count() != self.columns.len() {
            return Err(format!(
                "{}: a change has {} columns where the relation has {}",
                self.table,
                tuple.column_count(),
                self.columns.len()
            ));
        }
        self.columns
            .iter()
            .zip(tuple.columns.iter())
            .map(|(column, data)| Ok((column.name.clone(), cell(column, data, decimals)?)))
            .collect()
    }

    /// The row's primary key values; an error when one is not in it.
    pub fn key_of(&self, row: &Row) -> Result<Key, String> {
        self.key
            .iter()
            .map(|&position| {
                let name = &self.columns[position].name;
                match row.iter().find(|(n, _)| n == name) {
                    Some((_, Cell::Value(value))) => Ok((name.clone(), value.clone())),
                    Some((_, Cell::Null)) => Err(format!("{}: primary key column {name:?} is null", self.table)),
                    Some((_, Cell::Unchanged)) => Err(format!(
                        "{}: primary key column {name:?} came as an unchanged TOAST value; set REPLICA IDENTITY FULL on the table",
                        self.table
                    )),
                    None => Err(format!("{}: primary key column {name:?} is missing from a change", self.table)),
                }
            })
            .collect()
    }

    /// Only the primary key's columns of `row` (what a key-only old tuple holds).
    fn key_columns(&self, row: Row) -> Row {
        row.into_iter()
            .filter(|(name, _)| self.key.iter().any(|&k| self.columns[k].name == *name))
            .collect()
    }
}

fn cell(column: &Column, data: &ColumnData, decimals: DecimalHandling) -> Result<Cell, String> {
    if data.is_null() {
        Ok(Cell::Null)
    } else if data.is_unchanged() {
        Ok(Cell::Unchanged)
    } else {
        let text = data
            .as_str()
            .ok_or_else(|| format!("column {:?}: a value that is not UTF-8 text", column.name))?;
        Ok(Cell::Value(to_json(column.type_oid, &text, decimals)))
    }
}

/// One column's value in a change.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Value(Value),
    /// A TOAST value an update left unchanged: `pgoutput` does not send it.
    Unchanged,
}

/// A row: its columns' names and values, in the table's order.
pub type Row = Vec<(Arc<str>, Cell)>;
/// A primary key: its columns' names and values, in the key's order.
pub type Key = Vec<(Arc<str>, Value)>;

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    /// A row read by a snapshot.
    Read,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// A change of one row.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub table: Arc<TableName>,
    pub op: Op,
    pub key: Key,
    /// The row before: whole under `REPLICA IDENTITY FULL`, else only its key
    /// (deletes) or nothing (updates).
    pub before: Option<Row>,
    pub after: Option<Row>,
}

impl Change {
    pub fn insert(relation: &Relation, after: Row) -> Result<Change, String> {
        Ok(Change {
            table: relation.table.clone(),
            op: Op::Create,
            key: relation.key_of(&after)?,
            before: None,
            after: Some(after),
        })
    }

    /// A snapshot's row.
    pub fn read(relation: &Relation, row: Row) -> Result<Change, String> {
        Ok(Change {
            op: Op::Read,
            ..Change::insert(relation, row)?
        })
    }

    /// `old` is the old tuple when the log carries one: the whole row (`full`,
    /// under `REPLICA IDENTITY FULL`) or only its key (the key changed). An
    /// update that changes the key is a delete of the old key and an insert of
    /// the new one, as the two keys' histories are separate.
    pub fn update(
        relation: &Relation,
        old: Option<Row>,
        full: bool,
        mut after: Row,
    ) -> Result<Vec<Change>, String> {
        let key = relation.key_of(&after)?;
        let old = old.map(|row| if full { row } else { relation.key_columns(row) });
        if let Some(old) = &old {
            if full {
                carry_unchanged(&mut after, old);
            }
            let old_key = relation.key_of(old)?;
            if old_key != key {
                return Ok(vec![
                    Change {
                        table: relation.table.clone(),
                        op: Op::Delete,
                        key: old_key,
                        before: Some(old.clone()),
                        after: None,
                    },
                    Change {
                        table: relation.table.clone(),
                        op: Op::Create,
                        key,
                        before: None,
                        after: Some(after),
                    },
                ]);
            }
        }
        Ok(vec![Change {
            table: relation.table.clone(),
            op: Op::Update,
            key,
            before: old.filter(|_| full),
            after: Some(after),
        }])
    }

    pub fn delete(relation: &Relation, old: Row, full: bool) -> Result<Change, String> {
        let before = if full { old } else { relation.key_columns(old) };
        Ok(Change {
            table: relation.table.clone(),
            op: Op::Delete,
            key: relation.key_of(&before)?,
            before: Some(before),
            after: None,
        })
    }

    /// The change of `self` then `next` (of the same row), as one; `None`
    /// when nothing is left (a row inserted and deleted).
    fn then(self, next: Change) -> Option<Change> {
        let before = self.before.or(next.before);
        match (self.op, next.op) {
            (Op::Create, Op::Delete) => None,
            (Op::Create, _) => Some(Change {
                op: Op::Create,
                before: None,
                after: next.after.map(|mut after| {
                    if let Some(previous) = &self.after {
                        carry_unchanged(&mut after, previous);
                    }
                    after
                }),
                ..next
            }),
            (_, Op::Delete) => Some(Change {
                op: Op::Delete,
                before,
                ..next
            }),
            // Deleted then inserted again, or updated again: an update from the
            // row before the transaction.
            (_, _) => Some(Change {
                op: Op::Update,
                after: next.after.map(|mut after| {
                    if let Some(previous) = &self.after {
                        carry_unchanged(&mut after, previous);
                    }
                    after
                }),
                before,
                ..next
            }),
        }
    }
}

/// Fills the unchanged TOAST values of `row` from `from`.
fn carry_unchanged(row: &mut Row, from: &Row) {
    for (name, value) in row.iter_mut() {
        if *value == Cell::Unchanged
            && let Some((_, previous)) = from.iter().find(|(n, _)| n == name)
        {
            *value = previous.clone();
        }
    }
}

/// The changes of one transaction, one per row (its net change), in the
/// order each row was first changed.
#[derive(Default)]
pub struct TransactionChanges {
    changes: Vec<Option<Change>>,
    rows: HashMap<(Arc<TableName>, String), usize>,
}

impl TransactionChanges {
    pub fn push(&mut self, change: Change) {
        let row = (change.table.clone(), key_text(&change.key));
        match self.rows.get(&row) {
            Some(&index) => {
                self.changes[index] = match self.changes[index].take() {
                    Some(previous) => previous.then(change),
                    None => Some(change),
                };
            }
            None => {
                self.rows.insert(row, self.changes.len());
                self.changes.push(Some(change));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether a change of `table` with `key` is among them.
    pub fn touches(&self, table: &Arc<TableName>, key: &Key) -> bool {
        self.rows.contains_key(&(table.clone(), key_text(key)))
    }

    pub fn into_changes(self) -> impl Iterator<Item = Change> {
        self.changes.into_iter().flatten()
    }
}

/// A key's identity: its values' JSON.
pub fn key_text(key: &Key) -> String {
    let values: Vec<&Value> = key.iter().map(|(_, v)| v).collect();
    serde_json::to_string(&values).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn relation() -> Relation {
        let column = |name: &str, type_oid| Column {
            name: name.into(),
            type_oid,
        };
        Relation::new(
            Arc::new(TableName::parse("public.orders").unwrap()),
            vec![column("id", 23), column("status", 25), column("notes", 25)],
            &["id".to_owned()],
        )
        .unwrap()
    }

    fn row(id: i64, status: &str, notes: Cell) -> Row {
        vec![
            ("id".into(), Cell::Value(json!(id))),
            ("status".into(), Cell::Value(json!(status))),
            ("notes".into(), notes),
        ]
    }

    fn text(s: &str) -> Cell {
        Cell::Value(json!(s))
    }

    fn net(changes: Vec<Change>) -> Vec<Change> {
        let mut txn = TransactionChanges::default();
        for change in changes {
            txn.push(change);
        }
        txn.into_changes().collect()
    }

    #[test]
    fn an_insert_then_updates_is_an_insert_of_the_last_row() {
        let r = relation();
        let changes = net(vec![
            Change::insert(&r, row(1, "new", text("n"))).unwrap(),
            Change::update(&r, None, false, row(1, "paid", Cell::Unchanged))
                .unwrap()
                .remove(0),
        ]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].op, Op::Create);
        // The unchanged TOAST value comes from the insert.
        assert_eq!(changes[0].after, Some(row(1, "paid", text("n"))));
    }

    #[test]
    fn an_insert_then_a_delete_leaves_nothing_and_other_rows_keep_their_order() {
        let r = relation();
        let changes = net(vec![
            Change::insert(&r, row(2, "a", Cell::Null)).unwrap(),
            Change::insert(&r, row(1, "a", Cell::Null)).unwrap(),
            Change::delete(&r, row(1, "a", Cell::Null), false).unwrap(),
            Change::insert(&r, row(3, "a", Cell::Null)).unwrap(),
        ]);
        let keys: Vec<_> = changes.iter().map(|c| c.key[0].1.clone()).collect();
        assert_eq!(keys, vec![json!(2), json!(3)]);
    }

    #[test]
    fn updates_then_a_delete_is_a_delete_of_the_row_before_the_transaction() {
        let r = relation();
        let before = row(1, "new", text("n"));
        let changes = net(vec![
            Change::update(&r, Some(before.clone()), true, row(1, "paid", text("n")))
                .unwrap()
                .remove(0),
            Change::delete(&r, row(1, "paid", text("n")), true).unwrap(),
        ]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].op, Op::Delete);
        assert_eq!(changes[0].before, Some(before));
    }

    #[test]
    fn a_delete_then_an_insert_of_the_same_key_is_an_update() {
        let r = relation();
        let old = row(1, "new", Cell::Null);
        let changes = net(vec![
            Change::delete(&r, old.clone(), true).unwrap(),
            Change::insert(&r, row(1, "again", Cell::Null)).unwrap(),
        ]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].op, Op::Update);
        assert_eq!(changes[0].before, Some(old));
        // Without the old row (REPLICA IDENTITY DEFAULT) the delete's before is
        // the key only, and the result is still an update.
        let changes = net(vec![
            Change::delete(&r, row(1, "x", Cell::Null), false).unwrap(),
            Change::insert(&r, row(1, "again", Cell::Null)).unwrap(),
        ]);
        assert_eq!(changes[0].op, Op::Update);
    }

    #[test]
    fn an_update_of_the_key_is_a_delete_and_an_insert() {
        let r = relation();
        let old_key_only = row(1, "ignored", Cell::Null);
        let changes =
            Change::update(&r, Some(old_key_only), false, row(2, "moved", Cell::Null)).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(
            (changes[0].op, changes[0].key[0].1.clone()),
            (Op::Delete, json!(1))
        );
        assert_eq!(
            changes[0].before,
            Some(vec![("id".into(), Cell::Value(json!(1)))])
        );
        assert_eq!(
            (changes[1].op, changes[1].key[0].1.clone()),
            (Op::Create, json!(2))
        );
    }

    #[test]
    fn full_old_rows_fill_unchanged_toast_values() {
        let r = relation();
        let changes = Change::update(
            &r,
            Some(row(1, "new", text("long notes"))),
            true,
            row(1, "paid", Cell::Unchanged),
        )
        .unwrap();
        assert_eq!(changes[0].after, Some(row(1, "paid", text("long notes"))));
    }

    #[test]
    fn keys_must_be_present_and_not_null() {
        let r = relation();
        let error = Change::insert(&r, row(1, "x", Cell::Null)[1..].to_vec()).unwrap_err();
        assert!(error.contains("\"id\" is missing"), "{error}");
        let mut null_key = row(1, "x", Cell::Null);
        null_key[0].1 = Cell::Null;
        assert!(
            Change::insert(&r, null_key)
                .unwrap_err()
                .contains("is null")
        );
        assert!(Relation::new(r.table.clone(), r.columns.clone(), &["nope".to_owned()]).is_err());
    }
}
