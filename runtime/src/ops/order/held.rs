//! The events an `order` step holds back, kept small and sorted.

use std::collections::BTreeMap;

use sonic_rs::Value;

use crate::event::{Event, Provenance};

/// A waiting event. Past a few megabytes waiting, as bytes: a parsed
/// document costs several times its JSON (about 2.1 KB for a 280-byte CDC
/// event), and a waiting event is only read again when it leaves. Below,
/// parsed as it came: most events wait briefly (a contiguous run's gap), and
/// serializing and parsing each again would cost more than they take.
pub(super) struct Held {
    pub seq: i64,
    pub arrived_ms: i64,
    pub arrival: u64,
    body: Body,
}

enum Body {
    Parsed(Event),
    Bytes {
        source: Option<Provenance>,
        /// The document's JSON, then the bytes the event arrived as unless
        /// they are the same bytes (the common case: nothing changed it).
        bytes: Box<[u8]>,
        document_len: usize,
    },
}

/// What a waiting event costs beyond its bytes: itself and its timer entry.
pub(super) const OVERHEAD: usize = std::mem::size_of::<Held>() + 32;

/// What a parsed event is counted as, per byte of its original: measured
/// about 7.5 on CDC events.
const PARSED_BYTES_PER_BYTE: usize = 8;

impl Held {
    /// An event kept parsed, as it came.
    pub fn parsed(seq: i64, arrived_ms: i64, arrival: u64, event: Event) -> Held {
        Held {
            seq,
            arrived_ms,
            arrival,
            body: Body::Parsed(event),
        }
    }

    /// An event kept as bytes.
    pub fn compact(seq: i64, arrived_ms: i64, arrival: u64, event: Event) -> Held {
        // Serializing a document never fails; were it to, the event would
        // leave as a dead letter with its original bytes.
        let document = sonic_rs::to_vec(&event.value).unwrap_or_default();
        Held::from_parts(
            seq,
            arrived_ms,
            arrival,
            event.source,
            &event.raw,
            &document,
        )
    }

    /// A waiting event of its parts (as the changelog has them), as bytes:
    /// a copy of exactly their size (keeping a read buffer would keep the
    /// allocator's larger block).
    pub fn from_parts(
        seq: i64,
        arrived_ms: i64,
        arrival: u64,
        source: Option<Provenance>,
        raw: &[u8],
        document: &[u8],
    ) -> Held {
        let bytes: Box<[u8]> = if raw == document {
            raw.into()
        } else {
            [document, raw].concat().into_boxed_slice()
        };
        Held {
            seq,
            arrived_ms,
            arrival,
            body: Body::Bytes {
                source,
                bytes,
                document_len: document.len(),
            },
        }
    }

    pub fn source(&self) -> Option<Provenance> {
        match &self.body {
            Body::Parsed(event) => event.source,
            Body::Bytes { source, .. } => *source,
        }
    }

    /// Appends the event's current document, as JSON.
    pub fn write_document(&self, out: &mut Vec<u8>) {
        match &self.body {
            Body::Parsed(event) => {
                let _ = sonic_rs::to_writer(&mut *out, &event.value);
            }
            Body::Bytes {
                bytes,
                document_len,
                ..
            } => out.extend_from_slice(&bytes[..*document_len]),
        }
    }

    /// The bytes the event arrived as.
    pub fn raw(&self) -> &[u8] {
        match &self.body {
            Body::Parsed(event) => &event.raw,
            Body::Bytes {
                bytes,
                document_len,
                ..
            } if *document_len == bytes.len() => bytes,
            Body::Bytes {
                bytes,
                document_len,
                ..
            } => &bytes[*document_len..],
        }
    }

    /// Bytes of memory it takes (estimated, when parsed).
    pub fn footprint(&self) -> usize {
        OVERHEAD
            + match &self.body {
                Body::Parsed(event) => event.raw.len() * PARSED_BYTES_PER_BYTE,
                Body::Bytes { bytes, .. } => bytes.len(),
            }
    }

    /// The event again, parsed; or its original bytes and why not.
    pub fn into_event(self) -> Result<Event, Event> {
        let (source, bytes, document_len) = match self.body {
            Body::Parsed(event) => return Ok(event),
            Body::Bytes {
                source,
                bytes,
                document_len,
            } => (source, bytes, document_len),
        };
        let value = crate::event::reparse(&bytes[..document_len]);
        let raw = if document_len == bytes.len() {
            bytes.into_vec()
        } else {
            bytes[document_len..].to_vec()
        };
        match value {
            Some(value) => Ok(Event { value, raw, source }),
            None => Err(Event {
                value: Value::default(),
                raw,
                source,
            }),
        }
    }
}

/// A key with more waiting events than this keeps them in a B-tree.
const MANY: usize = 64;

/// One key's waiting events, ascending by sequence: a short sorted vector for
/// the few most keys hold, a B-tree once a key holds many, so that each insert
/// and each release stays O(log n) however many wait.
pub(super) enum Waiting {
    Few(Vec<Held>),
    Many(BTreeMap<i64, Held>),
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting::Few(Vec::new())
    }
}

impl Waiting {
    pub fn len(&self) -> usize {
        match self {
            Waiting::Few(few) => few.len(),
            Waiting::Many(many) => many.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, seq: i64) -> bool {
        match self {
            Waiting::Few(few) => few.binary_search_by_key(&seq, |h| h.seq).is_ok(),
            Waiting::Many(many) => many.contains_key(&seq),
        }
    }

    /// Adds an event whose sequence is not waiting yet.
    pub fn insert(&mut self, held: Held) {
        match self {
            Waiting::Few(few) => {
                let position = few
                    .binary_search_by_key(&held.seq, |h| h.seq)
                    .unwrap_or_else(|p| p);
                if few.len() == few.capacity() {
                    // Grow by half: most keys hold one or two events.
                    few.reserve_exact((few.len() / 2).max(1));
                }
                few.insert(position, held);
                if few.len() > MANY {
                    let many = std::mem::take(few)
                        .into_iter()
                        .map(|h| (h.seq, h))
                        .collect();
                    *self = Waiting::Many(many);
                }
            }
            Waiting::Many(many) => {
                many.insert(held.seq, held);
            }
        }
    }

    pub fn first_seq(&self) -> Option<i64> {
        match self {
            Waiting::Few(few) => few.first().map(|h| h.seq),
            Waiting::Many(many) => many.first_key_value().map(|(&seq, _)| seq),
        }
    }

    /// Takes the lowest sequence; a key left empty gives its memory back.
    pub fn pop_first(&mut self) -> Option<Held> {
        let first = match self {
            Waiting::Few(few) if few.is_empty() => None,
            Waiting::Few(few) => Some(few.remove(0)),
            Waiting::Many(many) => many.pop_first().map(|(_, h)| h),
        };
        if self.is_empty() {
            *self = Waiting::default();
        }
        first
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = &Held> + '_> {
        match self {
            Waiting::Few(few) => Box::new(few.iter()),
            Waiting::Many(many) => Box::new(many.values()),
        }
    }

    pub fn iter_mut(&mut self) -> Box<dyn Iterator<Item = &mut Held> + '_> {
        match self {
            Waiting::Few(few) => Box::new(few.iter_mut()),
            Waiting::Many(many) => Box::new(many.values_mut()),
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("seq", &self.seq)
            .field("footprint", &self.footprint())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use sonic_rs::JsonValueTrait;

    use super::*;

    fn event(json: &str) -> Event {
        Event::parse(json.as_bytes().to_vec()).expect("an event")
    }

    fn document(held: &Held) -> Vec<u8> {
        let mut out = Vec::new();
        held.write_document(&mut out);
        out
    }

    fn held(seq: i64) -> Held {
        Held::compact(seq, 0, seq as u64, event(&format!(r#"{{"seq":{seq}}}"#)))
    }

    #[test]
    fn an_unchanged_event_is_kept_once_and_comes_back_equal() {
        let original = event(r#"{"k":"a","seq":7,"n":1.50,"big":123456789012345678901234567890}"#);
        let value = original.value.clone();
        let held = Held::compact(7, 1, 2, original.clone());
        assert_eq!(held.raw(), original.raw.as_slice());
        assert_eq!(held.footprint(), OVERHEAD + original.raw.len());
        let back = held.into_event().expect("parses again");
        assert_eq!(back.value, value);
        assert_eq!(back.raw, original.raw);
    }

    #[test]
    fn a_changed_event_keeps_its_document_and_its_original_bytes() {
        let mut changed = event(r#"{ "k" : "a" }"#);
        changed.value = sonic_rs::from_str(r#"{"k":"b"}"#).unwrap();
        changed.source = Some(Provenance {
            partition: 3,
            offset: 9,
        });
        let held = Held::compact(1, 0, 0, changed);
        assert_eq!(document(&held), br#"{"k":"b"}"#);
        assert_eq!(held.raw(), br#"{ "k" : "a" }"#);
        let back = held.into_event().expect("parses again");
        assert_eq!(back.value["k"].as_str(), Some("b"));
        assert_eq!(back.raw, br#"{ "k" : "a" }"#);
        assert_eq!(back.source.map(|s| s.offset), Some(9));
        let restored = Held::from_parts(1, 0, 0, None, br#"{ "k" : "a" }"#, br#"{"k":"b"}"#);
        assert_eq!(document(&restored), br#"{"k":"b"}"#);
        assert_eq!(restored.raw(), br#"{ "k" : "a" }"#);
    }

    #[test]
    fn a_parsed_event_is_written_as_its_document_and_comes_back_as_it_was() {
        let original = event(r#"{"k":"a", "n":1.50}"#);
        let held = Held::parsed(1, 0, 0, original.clone());
        assert_eq!(held.raw(), original.raw.as_slice());
        // As the sinks would write it.
        let mut line = Vec::new();
        original.write_json_line(&mut line);
        line.pop();
        assert_eq!(document(&held), line);
        assert!(held.footprint() > OVERHEAD + original.raw.len() * 4);
        let back = held.into_event().expect("as it was");
        assert_eq!(back.value, original.value);
    }

    #[test]
    fn a_document_that_does_not_parse_comes_back_as_its_original_bytes() {
        let broken = Held::from_parts(1, 0, 0, None, b"original", b"{not json");
        let event = broken.into_event().expect_err("not JSON");
        assert_eq!(event.raw, b"original");
    }

    #[test]
    fn waiting_events_stay_sorted_across_the_switch_to_a_tree_and_back() {
        let mut waiting = Waiting::default();
        // 100 sequences in a scrambled order: past MANY, into the tree.
        let order: Vec<i64> = (0..100).map(|i| (i * 37) % 100).collect();
        for &seq in &order {
            assert!(!waiting.contains(seq));
            waiting.insert(held(seq));
            assert!(waiting.contains(seq));
        }
        assert!(matches!(waiting, Waiting::Many(_)));
        assert_eq!(waiting.len(), 100);
        let listed: Vec<i64> = waiting.iter().map(|h| h.seq).collect();
        assert_eq!(listed, (0..100).collect::<Vec<_>>());
        for expected in 0..100 {
            assert_eq!(waiting.first_seq(), Some(expected));
            assert_eq!(waiting.pop_first().map(|h| h.seq), Some(expected));
        }
        assert!(waiting.is_empty());
        assert!(matches!(&waiting, Waiting::Few(few) if few.capacity() == 0));
        assert!(waiting.pop_first().is_none());
    }
}
