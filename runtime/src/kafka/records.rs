//! What Keystone's records carry besides the event: the headers naming the
//! pipeline source record an event comes from, and record keys.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

use crate::event::Provenance;

/// Headers of repartition and sink records naming the pipeline source record
/// (partition and offset, as decimal text) an event comes from.
pub const SOURCE_PARTITION_HEADER: &str = "keystone.source.partition";
pub const SOURCE_OFFSET_HEADER: &str = "keystone.source.offset";

pub fn provenance_headers(source: Option<Provenance>) -> Option<OwnedHeaders> {
    let source = source?;
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    Some(
        OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: SOURCE_PARTITION_HEADER,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: SOURCE_OFFSET_HEADER,
                value: Some(offset.as_bytes()),
            }),
    )
}

/// The source record a repartition or sink record names in its headers.
pub fn provenance_of(message: &impl Message) -> Option<Provenance> {
    let headers = message.headers()?;
    let (mut partition, mut offset) = (None, None);
    for header in headers.iter() {
        let text = || std::str::from_utf8(header.value?).ok();
        match header.key {
            SOURCE_PARTITION_HEADER => partition = text().and_then(|t| t.parse().ok()),
            SOURCE_OFFSET_HEADER => offset = text().and_then(|t| t.parse().ok()),
            _ => {}
        }
    }
    Some(Provenance {
        partition: partition?,
        offset: offset?,
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    use super::{SOURCE_PARTITION_HEADER, provenance_headers, provenance_of};
    use crate::event::Provenance;
    use rdkafka::message::{Header, Headers, OwnedHeaders};

    fn message(headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    #[test]
    fn provenance_round_trips_through_headers() {
        let source = Provenance {
            partition: 7,
            offset: 1_234_567_890_123,
        };
        let headers = provenance_headers(Some(source));
        assert_eq!(provenance_of(&message(headers)), Some(source));
        assert_eq!(provenance_headers(None).map(|h| h.count()), None);
        assert_eq!(provenance_of(&message(None)), None);
        let partial = OwnedHeaders::new().insert(Header {
            key: SOURCE_PARTITION_HEADER,
            value: Some("3"),
        });
        assert_eq!(provenance_of(&message(Some(partial))), None);
    }
}
