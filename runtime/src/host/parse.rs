//! Parsing ahead of the steps. A polled batch is cut into chunks; a second
//! thread parses and checks them against the source schema in the batch's
//! order while this thread runs the steps (and the sinks) of the chunks
//! already checked. Parsing needs none of the steps' state and is about a
//! third of a stage's work per event: this way a stage keeps two cores busy,
//! and its output is the same, in the same order, as one thread's.

use std::collections::BTreeMap;
use std::sync::mpsc;

use crate::host::process::{OffsetLookup, Records};
use crate::task::{Checked, SourceCheck};

/// Records per chunk: small enough that the steps start soon after the poll,
/// large enough that handing a chunk over costs nothing next to parsing it.
pub(super) const CHUNK: usize = 256;

/// Batches smaller than this are parsed on the steps' thread: a thread of its
/// own would cost more than it saves.
pub(super) const PARSE_AHEAD_MIN: usize = 2 * CHUNK;

/// One chunk of one partition's records, parsed and checked.
pub(super) struct Parsed {
    pub(super) partition: i32,
    /// The offset of the chunk's last record.
    pub(super) last_offset: i64,
    /// The chunk's records by their bytes, to find a dead letter's offset.
    pub(super) offsets: OffsetLookup,
    pub(super) checked: Checked,
}

/// Parses and checks one partition's records (in offset order); `None` for
/// no records.
pub(super) fn parse(checker: &SourceCheck, partition: i32, records: Records) -> Option<Parsed> {
    let last_offset = records.last().map(|(offset, _, _)| *offset)?;
    let mut offsets = OffsetLookup::default();
    let checked = checker.check_apart(records.into_iter().map(|(offset, payload, source)| {
        let payload = payload.unwrap_or_default();
        offsets.record(&payload, offset);
        (payload, source)
    }));
    Some(Parsed {
        partition,
        last_offset,
        offsets,
        checked,
    })
}

/// Hands every chunk of `batch`, parsed, to `each` in order (partition by
/// partition, offsets ascending), parsing ahead on a second thread when the
/// batch is large enough. The first error of `each` ends the batch: the
/// chunks after it are not handed over.
pub(super) fn parse_ahead<E>(
    checker: &SourceCheck,
    batch: BTreeMap<i32, Records>,
    mut each: impl FnMut(Parsed) -> Result<(), E>,
) -> Result<(), E> {
    let total: usize = batch.values().map(Vec::len).sum();
    if total < PARSE_AHEAD_MIN {
        for (partition, records) in batch {
            if let Some(parsed) = parse(checker, partition, records) {
                each(parsed)?;
            }
        }
        return Ok(());
    }
    let mut chunks = chunks(batch).into_iter();
    let Some((first_partition, first_records)) = chunks.next() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let (parsed_tx, parsed_rx) = mpsc::channel();
        scope.spawn(move || {
            for (partition, records) in chunks {
                let Some(parsed) = parse(checker, partition, records) else {
                    continue;
                };
                // The steps stopped at an error: the rest is not wanted.
                if parsed_tx.send(parsed).is_err() {
                    return;
                }
            }
        });
        // The first chunk here, while the other thread starts on the second.
        if let Some(parsed) = parse(checker, first_partition, first_records) {
            each(parsed)?;
        }
        for parsed in parsed_rx {
            each(parsed)?;
        }
        Ok(())
    })
}

/// `batch` as chunks of at most [`CHUNK`] records, partition by partition.
fn chunks(batch: BTreeMap<i32, Records>) -> Vec<(i32, Records)> {
    let mut chunks = Vec::new();
    for (partition, records) in batch {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            chunks.push((partition, records.by_ref().take(CHUNK).collect()));
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use keystone_crds::schema::SchemaSpec;

    use super::*;
    use sonic_rs::JsonValueTrait;

    use crate::event::Provenance;

    fn batch(partitions: i32, per_partition: i64) -> BTreeMap<i32, Records> {
        (0..partitions)
            .map(|partition| {
                let records = (0..per_partition)
                    .map(|offset| {
                        // Every seventh record is not JSON, every eleventh lacks
                        // the required field: dead letters among the events.
                        let payload = if offset % 7 == 3 {
                            b"{not json".to_vec()
                        } else if offset % 11 == 5 {
                            format!(r#"{{"other":{offset}}}"#).into_bytes()
                        } else {
                            format!(r#"{{"id":"{partition}-{offset}"}}"#).into_bytes()
                        };
                        let source = Provenance { partition, offset };
                        (offset, Some(payload), Some(source))
                    })
                    .collect();
                (partition, records)
            })
            .collect()
    }

    fn checker() -> SourceCheck {
        let schema: SchemaSpec =
            serde_json::from_str(r#"{"fields":[{"name":"id","type":"string"}]}"#).unwrap();
        SourceCheck::new(Some(&schema))
    }

    /// What one thread finds, partition by partition: ids, dead letters with
    /// their offsets, last offsets.
    type Seen = Vec<(i32, Vec<String>, Vec<(Option<i64>, String)>, i64)>;

    fn collect(mut parsed: Parsed, seen: &mut Seen) -> Result<(), ()> {
        let ids = parsed
            .checked
            .events
            .iter()
            .map(|e| {
                e.value
                    .get("id")
                    .and_then(|v| v.as_str())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let letters = parsed
            .checked
            .dead_letters
            .iter()
            .map(|l| (parsed.offsets.take(&l.original), l.reason.clone()))
            .collect();
        seen.push((parsed.partition, ids, letters, parsed.last_offset));
        Ok(())
    }

    /// Chunks of one partition glued back together, as one thread sees them.
    fn by_partition(seen: Seen) -> Seen {
        let mut merged: Seen = Vec::new();
        for (partition, ids, letters, last) in seen {
            match merged.last_mut() {
                Some(entry) if entry.0 == partition => {
                    entry.1.extend(ids);
                    entry.2.extend(letters);
                    entry.3 = last;
                }
                _ => merged.push((partition, ids, letters, last)),
            }
        }
        merged
    }

    #[test]
    fn parsing_ahead_hands_over_what_one_thread_finds_in_the_same_order() {
        let checker = checker();
        let input = batch(3, 1000);
        let mut one_thread: Seen = Vec::new();
        for (partition, records) in input.clone() {
            collect(
                parse(&checker, partition, records).unwrap(),
                &mut one_thread,
            )
            .unwrap();
        }
        let mut ahead: Seen = Vec::new();
        parse_ahead(&checker, input, |parsed| collect(parsed, &mut ahead)).unwrap();
        assert!(ahead.len() > 3, "the batch went in chunks: {}", ahead.len());
        assert_eq!(by_partition(ahead), one_thread);
        let letters: usize = one_thread.iter().map(|(_, _, l, _)| l.len()).sum();
        assert!(letters > 300, "dead letters among the events: {letters}");
        assert!(
            one_thread
                .iter()
                .flat_map(|(_, _, l, _)| l)
                .all(|(offset, _)| offset.is_some()),
            "every dead letter finds its offset"
        );
    }

    #[test]
    fn an_error_ends_the_batch_and_the_parsing_thread_with_it() {
        let checker = checker();
        let mut handed = 0;
        let result = parse_ahead(&checker, batch(2, 2000), |_| {
            handed += 1;
            if handed == 3 { Err("stop") } else { Ok(()) }
        });
        assert_eq!(result, Err("stop"));
        assert_eq!(handed, 3, "nothing is handed over after the error");
    }

    #[test]
    fn avro_records_are_parsed_and_their_dead_letters_find_their_offsets() {
        use keystone_avro::{AvroSchema, Shape};
        let text =
            r#"{"type": "record", "name": "Click", "fields": [{"name": "id", "type": "string"}]}"#;
        let shape = || Shape::new(AvroSchema::parse_str(text).expect("schema")).expect("shape");
        let decoder = std::sync::Arc::new(crate::avro::AvroDecoder::new(shape()));
        let records: Records = (0..600i64)
            .map(|offset| {
                let payload = if offset % 9 == 4 {
                    // JSON on an Avro topic.
                    format!(r#"{{"id":"{offset}"}}"#).into_bytes()
                } else {
                    keystone_avro::encode(
                        &serde_json::json!({"id": offset.to_string()}),
                        &shape(),
                        5,
                    )
                    .expect("encode")
                };
                (
                    offset,
                    Some(payload),
                    Some(Provenance {
                        partition: 0,
                        offset,
                    }),
                )
            })
            .collect();
        let payloads: Vec<&[u8]> = records
            .iter()
            .filter_map(|(_, p, _)| p.as_deref())
            .collect();
        assert_eq!(
            decoder
                .unknown_ids(payloads)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![5]
        );
        decoder
            .learn(
                5,
                Ok(std::sync::Arc::new(
                    AvroSchema::parse_str(text).expect("schema"),
                )),
            )
            .expect("learn");
        let schema: SchemaSpec =
            serde_json::from_str(r#"{"fields":[{"name":"id","type":"string"}]}"#).unwrap();
        let checker = SourceCheck::new(Some(&schema)).reading_avro(decoder);
        let mut seen: Seen = Vec::new();
        parse_ahead(&checker, BTreeMap::from([(0, records)]), |parsed| {
            collect(parsed, &mut seen)
        })
        .unwrap();
        let seen = by_partition(seen);
        let (_, ids, letters, last) = &seen[0];
        assert_eq!(*last, 599);
        let expected_ids: Vec<String> = (0..600)
            .filter(|o| o % 9 != 4)
            .map(|o: i64| o.to_string())
            .collect();
        assert_eq!(ids, &expected_ids);
        let expected_letters: Vec<Option<i64>> =
            (0..600).filter(|o| o % 9 == 4).map(Some).collect();
        assert_eq!(
            letters.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            expected_letters
        );
        assert!(
            letters
                .iter()
                .all(|(_, r)| r.contains("it looks like JSON")),
            "{letters:?}"
        );
    }

    #[test]
    fn small_batches_are_parsed_whole_per_partition() {
        let checker = checker();
        let mut seen: Seen = Vec::new();
        parse_ahead(&checker, batch(2, 100), |parsed| collect(parsed, &mut seen)).unwrap();
        let partitions: Vec<i32> = seen.iter().map(|(p, ..)| *p).collect();
        assert_eq!(partitions, vec![0, 1]);
        assert_eq!(seen[1].3, 99);
    }
}
