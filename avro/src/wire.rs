//! The Confluent wire format: magic byte 0, the writer schema's registry id as
//! a 4-byte big-endian integer, then the Avro binary datum.

/// The first byte of every framed record.
pub const MAGIC: u8 = 0;
const HEADER: usize = 5;

/// Why bytes are not a framed record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error(
        "not in the schema registry's wire format: {len} bytes, shorter than the 5-byte header (magic byte 0 and a 4-byte schema id)"
    )]
    Truncated { len: usize },
    #[error(
        "not in the schema registry's wire format: the first byte is {found:#04x}, not the magic byte 0x00{hint}"
    )]
    WrongMagic { found: u8, hint: &'static str },
}

/// A record's writer schema id and its Avro datum.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8]), WireError> {
    match bytes.first() {
        Some(&MAGIC) if bytes.len() >= HEADER => {
            let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            Ok((id, &bytes[HEADER..]))
        }
        Some(&MAGIC) | None => Err(WireError::Truncated { len: bytes.len() }),
        Some(&found) => Err(WireError::WrongMagic {
            found,
            // JSON on an Avro topic is the commonest mix-up.
            hint: if matches!(found, b'{' | b'[') {
                " (it looks like JSON: is the topic's format json?)"
            } else {
                ""
            },
        }),
    }
}

/// Frames an Avro datum written with the schema registered as `id`.
pub fn frame(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + datum.len());
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_split_round_trip() {
        let framed = frame(0x0102_0304, b"\x02ab");
        assert_eq!(framed, b"\x00\x01\x02\x03\x04\x02ab");
        assert_eq!(split(&framed), Ok((0x0102_0304, &b"\x02ab"[..])));
    }

    #[test]
    fn an_empty_datum_is_a_record() {
        // A record of no fields (or only nulls) encodes to no bytes.
        assert_eq!(split(&frame(7, b"")), Ok((7, &b""[..])));
    }

    #[test]
    fn short_and_foreign_bytes_are_named() {
        assert_eq!(split(b""), Err(WireError::Truncated { len: 0 }));
        assert_eq!(split(b"\x00\x00\x01"), Err(WireError::Truncated { len: 3 }));
        let json = split(b"{\"id\":1}").unwrap_err();
        assert_eq!(
            json.to_string(),
            "not in the schema registry's wire format: the first byte is 0x7b, not the magic byte 0x00 (it looks like JSON: is the topic's format json?)"
        );
        assert!(matches!(
            split(b"\x01\x00\x00\x00\x01"),
            Err(WireError::WrongMagic { found: 1, hint: "" })
        ));
    }
}
