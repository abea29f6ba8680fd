//! Watched objects as 16-byte keys.
//!
//! The wake filter and the owned-object index keep an entry per watched
//! object: with 10,000 Pipelines that is some 50,000 objects, and a uid kept
//! as a `String` (36 bytes on the heap, 24 inline, the allocator's overhead)
//! cost more than the rest of the entry. The API server's uids are UUIDs,
//! which fit in 16 bytes.

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct ObjectKey(u128);

impl ObjectKey {
    /// A uid: a UUID (what the API server writes) by its bits, anything else
    /// by a 128-bit hash.
    pub(super) fn from_uid(uid: &str) -> Self {
        match uuid::Uuid::try_parse(uid) {
            Ok(parsed) => Self(parsed.as_u128()),
            Err(_) => Self::hashed(uid),
        }
    }

    /// An object's uid (a re-created object is another), else its place.
    pub(super) fn of(meta: &ObjectMeta) -> Self {
        match &meta.uid {
            Some(uid) => Self::from_uid(uid),
            None => Self::hashed((
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default(),
            )),
        }
    }

    fn hashed(value: impl Hash) -> Self {
        let half = |seed: u8| {
            let mut hasher = DefaultHasher::new();
            seed.hash(&mut hasher);
            value.hash(&mut hasher);
            hasher.finish()
        };
        Self((u128::from(half(0)) << 64) | u128::from(half(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_kept_by_their_bits_and_other_uids_hashed_apart() {
        let uid = "6f1c2a3e-9b4d-4e5f-8a7b-0c1d2e3f4a5b";
        assert_eq!(
            ObjectKey::from_uid(uid),
            ObjectKey(0x6f1c2a3e_9b4d_4e5f_8a7b_0c1d2e3f4a5b)
        );
        assert_eq!(ObjectKey::from_uid("d1"), ObjectKey::from_uid("d1"));
        assert_ne!(ObjectKey::from_uid("d1"), ObjectKey::from_uid("d2"));
    }

    #[test]
    fn an_object_without_a_uid_is_keyed_by_its_place() {
        let at = |namespace: &str, name: &str| ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        };
        assert_eq!(ObjectKey::of(&at("a", "b")), ObjectKey::of(&at("a", "b")));
        // Not confused by where the separator would fall.
        assert_ne!(
            ObjectKey::of(&at("a/b", "c")),
            ObjectKey::of(&at("a", "b/c"))
        );
        let with_uid = ObjectMeta {
            uid: Some("u".into()),
            ..at("a", "b")
        };
        assert_eq!(ObjectKey::of(&with_uid), ObjectKey::from_uid("u"));
    }
}
