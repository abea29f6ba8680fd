//! Snapshots by watermarks (DBLog, Netflix 2019): a table is read in chunks
//! by primary key while the log keeps flowing, and never stops it.
//!
//! For each chunk the capture writes a low watermark into the log, selects
//! the chunk, and writes a high watermark. Watermarks are transactional
//! logical messages (`pg_logical_emit_message`), so they take their place in
//! commit order without a table of their own. When the log reaches the low
//! watermark the chunk opens; every change the log carries for one of its
//! keys before the high watermark removes that key from the chunk (the change
//! is as new as the selected row, or newer); at the high watermark the rows
//! left are emitted, ordered by the high watermark's commit LSN. A change of
//! a row that the chunk's select could not see commits after the select, so
//! after the high watermark: every row's events stay in commit order.

use std::collections::HashMap;
use std::sync::Arc;

use crate::capture::changes::{Change, Key, TableName, key_text};

/// The prefix of the watermark messages in the log.
pub const WATERMARK_PREFIX: &str = "keystone.watermark";

/// Where a snapshot stands, committed with the events it emitted.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotProgress {
    /// The request this snapshot serves (`spec.source.postgres.snapshot.trigger`
    /// when it was started by one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The table being read, as an index into the captured tables.
    pub table: usize,
    /// The primary key (text of each column) of the last row emitted from
    /// that table; `None` before its first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    /// Rows emitted and chunks done, over all tables.
    pub rows: u64,
    pub chunks: u64,
    pub done: bool,
}

/// Which watermark a log message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watermark {
    Low(String),
    High(String),
}

impl Watermark {
    pub fn content(&self) -> String {
        match self {
            Watermark::Low(id) => format!("{id}:low"),
            Watermark::High(id) => format!("{id}:high"),
        }
    }

    pub fn parse(prefix: &str, content: &[u8]) -> Option<Watermark> {
        if prefix != WATERMARK_PREFIX {
            return None;
        }
        let text = std::str::from_utf8(content).ok()?;
        let (id, which) = text.rsplit_once(':')?;
        match which {
            "low" => Some(Watermark::Low(id.to_owned())),
            "high" => Some(Watermark::High(id.to_owned())),
            _ => None,
        }
    }
}

/// A chunk selected between its watermarks, waiting for the log to reach them.
pub struct Chunk {
    pub id: String,
    pub table: Arc<TableName>,
    rows: Vec<Option<Change>>,
    keys: HashMap<String, usize>,
    /// The primary key text of the chunk's last row: where the next chunk starts.
    pub last_key: Option<Vec<String>>,
    /// Whether the select returned fewer rows than asked: the table is done.
    pub ends_table: bool,
    open: bool,
}

/// What the log did to a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Reached {
    /// Not this chunk's watermark (another instance's, or an old one).
    Nothing,
    Low,
    High,
}

impl Chunk {
    pub fn new(
        id: String,
        table: Arc<TableName>,
        rows: Vec<Change>,
        last_key: Option<Vec<String>>,
        ends_table: bool,
    ) -> Chunk {
        let keys = rows
            .iter()
            .enumerate()
            .map(|(i, change)| (key_text(&change.key), i))
            .collect();
        Chunk {
            id,
            table,
            rows: rows.into_iter().map(Some).collect(),
            keys,
            last_key,
            ends_table,
            open: false,
        }
    }

    /// A watermark seen in the log.
    pub fn reach(&mut self, watermark: &Watermark) -> Reached {
        match watermark {
            Watermark::Low(id) if *id == self.id => {
                self.open = true;
                Reached::Low
            }
            Watermark::High(id) if *id == self.id => Reached::High,
            _ => Reached::Nothing,
        }
    }

    /// A change the log carries: between the watermarks, it wins over the
    /// chunk's row of the same key.
    pub fn overtaken_by(&mut self, table: &Arc<TableName>, key: &Key) {
        if self.open
            && *table == self.table
            && let Some(&index) = self.keys.get(&key_text(key))
        {
            self.rows[index] = None;
        }
    }

    /// The rows to emit at the high watermark.
    pub fn into_rows(self) -> impl Iterator<Item = Change> {
        self.rows.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::capture::changes::{Cell, Op};

    fn read(table: &Arc<TableName>, id: i64) -> Change {
        Change {
            table: table.clone(),
            op: Op::Read,
            key: vec![("id".into(), json!(id))],
            before: None,
            after: Some(vec![("id".into(), Cell::Value(json!(id)))]),
        }
    }

    fn key(id: i64) -> Key {
        vec![("id".into(), json!(id))]
    }

    #[test]
    fn changes_between_the_watermarks_win_over_the_chunks_rows() {
        let table = Arc::new(TableName::parse("public.t").unwrap());
        let other = Arc::new(TableName::parse("public.u").unwrap());
        let rows = (1..=4).map(|id| read(&table, id)).collect();
        let mut chunk = Chunk::new(
            "c1".into(),
            table.clone(),
            rows,
            Some(vec!["4".into()]),
            false,
        );
        // Before the low watermark the log is older than the select.
        chunk.overtaken_by(&table, &key(1));
        assert_eq!(
            chunk.reach(&Watermark::Low("other".into())),
            Reached::Nothing
        );
        assert_eq!(chunk.reach(&Watermark::Low("c1".into())), Reached::Low);
        chunk.overtaken_by(&table, &key(2));
        chunk.overtaken_by(&other, &key(3));
        chunk.overtaken_by(&table, &key(99));
        assert_eq!(chunk.reach(&Watermark::High("c1".into())), Reached::High);
        let left: Vec<_> = chunk.into_rows().map(|c| c.key[0].1.clone()).collect();
        assert_eq!(left, vec![json!(1), json!(3), json!(4)]);
    }

    #[test]
    fn watermarks_round_trip_through_their_message_content() {
        let low = Watermark::Low("a:b".into());
        assert_eq!(
            Watermark::parse(WATERMARK_PREFIX, low.content().as_bytes()),
            Some(low)
        );
        assert_eq!(Watermark::parse("other", b"x:low"), None);
        assert_eq!(Watermark::parse(WATERMARK_PREFIX, b"x:middle"), None);
        assert_eq!(Watermark::parse(WATERMARK_PREFIX, &[0xff, b':']), None);
    }
}
