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
//! left are emitted, ordered by the high watermark's commit LSN.
//!
//! Commit order in the log is not quite visibility order: a transaction
//! writes its commit record, and only then do other sessions see it. One
//! whose commit record precedes the low watermark can still be invisible to
//! the chunk's select. So the select runs in a repeatable-read transaction
//! that also reads its own snapshot (`pg_current_snapshot()`), and a change
//! by a transaction that snapshot could not see overtakes the chunk's row
//! wherever in the log it comes before the high watermark. Every row's
//! events then stay in commit order.

use std::collections::{HashMap, HashSet, VecDeque};
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

/// Which transactions a PostgreSQL snapshot sees, from the text of
/// `pg_current_snapshot()` (`xmin:xmax:xip,...`), by 32-bit transaction id
/// as the log names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    xmax: u32,
    in_progress: HashSet<u32>,
}

impl Visibility {
    pub fn parse(text: &str) -> Result<Visibility, String> {
        let invalid = || format!("a snapshot {text:?} is not xmin:xmax:xip");
        let mut parts = text.trim().splitn(3, ':');
        let (Some(_xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        // The log's transaction ids are the 64-bit ones without their epoch.
        let xid = |t: &str| t.parse::<u64>().map(|x| x as u32).map_err(|_| invalid());
        let in_progress = xip
            .split(',')
            .filter(|t| !t.is_empty())
            .map(xid)
            .collect::<Result<_, _>>()?;
        Ok(Visibility {
            xmax: xid(xmax)?,
            in_progress,
        })
    }

    /// Whether a transaction that committed is visible to the snapshot: one
    /// it found running, or that started at or after its `xmax`, is not.
    pub fn sees(&self, xid: u32) -> bool {
        precedes(xid, self.xmax) && !self.in_progress.contains(&xid)
    }
}

/// PostgreSQL's circular order of 32-bit transaction ids.
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The ids of the transactions the capture emitted most recently.
pub struct RecentTransactions {
    order: VecDeque<u32>,
    capacity: usize,
}

impl RecentTransactions {
    pub fn new(capacity: usize) -> RecentTransactions {
        RecentTransactions {
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, xid: u32) {
        if self.order.len() == self.capacity {
            self.order.pop_front();
        }
        self.order.push_back(xid);
    }

    /// One the snapshot does not see: emitted before a select that missed
    /// its changes, so that select's rows would be older than events already
    /// sent.
    pub fn any_unseen_by(&self, visibility: &Visibility) -> Option<u32> {
        self.order
            .iter()
            .copied()
            .find(|&xid| !visibility.sees(xid))
    }
}

/// A chunk selected between its watermarks, waiting for the log to reach them.
pub struct Chunk {
    pub id: String,
    pub table: Arc<TableName>,
    /// What the chunk's select saw.
    visibility: Visibility,
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
        visibility: Visibility,
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
            visibility,
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

    /// A change the log carries, by transaction `xid`: between the
    /// watermarks, or anywhere before the high one when the select could not
    /// see its transaction, it wins over the chunk's row of the same key.
    pub fn overtaken_by(&mut self, xid: u32, table: &Arc<TableName>, key: &Key) {
        if (self.open || !self.visibility.sees(xid))
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
        // The select saw every transaction before 100.
        let visibility = Visibility::parse("90:100:").unwrap();
        let mut chunk = Chunk::new(
            "c1".into(),
            table.clone(),
            visibility,
            rows,
            Some(vec!["4".into()]),
            false,
        );
        // Before the low watermark the log is older than the select.
        chunk.overtaken_by(95, &table, &key(1));
        assert_eq!(
            chunk.reach(&Watermark::Low("other".into())),
            Reached::Nothing
        );
        assert_eq!(chunk.reach(&Watermark::Low("c1".into())), Reached::Low);
        chunk.overtaken_by(101, &table, &key(2));
        chunk.overtaken_by(101, &other, &key(3));
        chunk.overtaken_by(101, &table, &key(99));
        assert_eq!(chunk.reach(&Watermark::High("c1".into())), Reached::High);
        let left: Vec<_> = chunk.into_rows().map(|c| c.key[0].1.clone()).collect();
        assert_eq!(left, vec![json!(1), json!(3), json!(4)]);
    }

    #[test]
    fn a_change_the_select_could_not_see_wins_even_before_the_low_watermark() {
        let table = Arc::new(TableName::parse("public.t").unwrap());
        let rows = (1..=4).map(|id| read(&table, id)).collect();
        // 97 was running when the select took its snapshot, and 100 had not
        // started; both may have written their commit records already.
        let visibility = Visibility::parse("95:100:95,97").unwrap();
        let mut chunk = Chunk::new("c1".into(), table.clone(), visibility, rows, None, true);
        chunk.overtaken_by(96, &table, &key(1));
        chunk.overtaken_by(97, &table, &key(2));
        chunk.overtaken_by(100, &table, &key(3));
        assert_eq!(chunk.reach(&Watermark::Low("c1".into())), Reached::Low);
        assert_eq!(chunk.reach(&Watermark::High("c1".into())), Reached::High);
        let left: Vec<_> = chunk.into_rows().map(|c| c.key[0].1.clone()).collect();
        assert_eq!(left, vec![json!(1), json!(4)]);
    }

    #[test]
    fn snapshot_visibility_follows_postgres_with_epochs_and_wraparound() {
        let visibility = Visibility::parse("4294967390:4294967400:4294967395").unwrap();
        // Epoch 1: the log's ids are the low 32 bits.
        assert!(visibility.sees(94));
        assert!(!visibility.sees(99));
        assert!(!visibility.sees(104));
        assert!(visibility.sees(u32::MAX - 5), "before the wrap, older");
        let wrapped = Visibility::parse("4294967290:4294967300:").unwrap();
        assert!(wrapped.sees(3), "xmax is 4 once the epoch is dropped");
        assert!(
            wrapped.sees(u32::MAX - 2),
            "just before xmax across the wrap"
        );
        assert!(!wrapped.sees(4), "xmax itself, across the wrap");
        assert!(Visibility::parse("1:2").is_err());
        assert!(Visibility::parse("1:x:").is_err());
        assert!(Visibility::parse("1:2:3,y").is_err());
    }

    #[test]
    fn a_recent_transaction_the_select_missed_is_found() {
        let mut recent = RecentTransactions::new(3);
        for xid in [10, 11, 12, 13] {
            recent.push(xid);
        }
        let seeing_all = Visibility::parse("14:14:").unwrap();
        assert_eq!(recent.any_unseen_by(&seeing_all), None);
        let missing_12 = Visibility::parse("12:14:12").unwrap();
        assert_eq!(recent.any_unseen_by(&missing_12), Some(12));
        // 10 fell out of the window of three.
        let missing_10 = Visibility::parse("10:14:10").unwrap();
        assert_eq!(recent.any_unseen_by(&missing_10), None);
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
