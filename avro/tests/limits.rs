//! The codec's allocation limit is process-wide and set by its first use, so
//! this test has a process of its own.

use keystone_avro::{MAX_DECLARED_LENGTH, RecordError, Shape, decode, limit_allocations};

#[test]
fn keystones_limit_is_in_force_when_set_first() {
    assert_eq!(limit_allocations(), MAX_DECLARED_LENGTH);
    let list = apache_avro::Schema::parse_str(
        r#"{"type": "record", "name": "L", "fields": [
          {"name": "xs", "type": {"type": "array", "items": "long"}}
        ]}"#,
    )
    .expect("schema");
    // One item more than the limit, as a zig-zag varint.
    let mut count = vec![];
    let mut n = ((MAX_DECLARED_LENGTH as u64) + 1) << 1;
    while n >= 0x80 {
        count.push((n as u8) | 0x80);
        n >>= 7;
    }
    count.push(n as u8);
    let reader = Shape::new(list.clone()).expect("shape");
    let error = decode(1, &count, &list, &reader).unwrap_err();
    assert!(
        matches!(&error, RecordError::Undecodable { reason, .. } if reason.contains(&MAX_DECLARED_LENGTH.to_string())),
        "{error}"
    );
}
