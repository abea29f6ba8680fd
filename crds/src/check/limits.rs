//! The limits the checker holds CEL expressions to, so that no expression it
//! accepts can make a step spend unbounded time or stack on one event.
//!
//! The `cel` interpreter cannot be interrupted and counts nothing while it runs,
//! so the bound is static, as Kubernetes bounds the CEL rules of a CRD: the
//! checker estimates the worst-case cost of every expression over any event of
//! at most [`MAX_EVENT_BYTES`] and refuses one over [`MAX_EXPRESSION_COST`].
//! docs/RELIABILITY.md says how the numbers were chosen.

/// The largest event, in bytes of JSON, the cost estimates assume: the size of
/// a list, map or string an expression reads from an event is bounded by it
/// (the schema gives no `maxItems` or `maxLength`). The runtime dead-letters
/// larger events.
pub const MAX_EVENT_BYTES: u64 = 1 << 20;

/// The longest expression, in characters: the CRD's `maxLength` of every
/// expression field, which `check` also applies before parsing one.
pub const MAX_EXPRESSION_LENGTH: usize = 4096;

/// The most an expression may cost on one event, in cost units: about one
/// unit per node evaluated (a variable, a call, a comparison of two numbers),
/// a tenth of a unit per byte a string or list operation goes through. A unit
/// is about 0.14 µs of the interpreter in a release build, so the limit is
/// about three seconds on the worst possible event of [`MAX_EVENT_BYTES`] (a
/// list of half a million numbers walked three levels deep), and an accepted
/// expression's cost grows at most linearly with the event's size.
pub const MAX_EXPRESSION_COST: u64 = 20_000_000;

/// How deeply the parts of an expression may nest (`!!!!x` is five deep,
/// `a + b + c` three). The interpreter and the checker recurse once per level.
pub const MAX_EXPRESSION_DEPTH: usize = 64;

/// How deeply brackets (`(`, `[`, `{`) may nest, checked before parsing: the
/// parser recurses through several frames per bracket.
pub const MAX_BRACKET_NESTING: usize = 16;

/// How many iterations (`all`, `exists`, `exists_one`, `map`, `filter`) may
/// run inside one another.
pub const MAX_COMPREHENSION_NESTING: usize = 3;

#[cfg(test)]
mod tests {
    use serde_json::Value as Json;

    use super::MAX_EXPRESSION_LENGTH;
    use crate::validate::crd_schema;

    /// Every `expression` and `deleteWhen` field in `schema`, with its maxLength.
    fn expression_limits(schema: &Json, name: &str, out: &mut Vec<(String, Option<u64>)>) {
        match schema {
            Json::Object(map) => {
                if let Some(Json::Object(properties)) = map.get("properties") {
                    for (key, child) in properties {
                        if key == "expression" || key == "deleteWhen" {
                            let max = child.get("maxLength").and_then(Json::as_u64);
                            out.push((format!("{name}.{key}"), max));
                        }
                    }
                }
                for (key, child) in map {
                    expression_limits(child, &format!("{name}.{key}"), out);
                }
            }
            Json::Array(items) => {
                for item in items {
                    expression_limits(item, name, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_crds_bound_every_expression_by_the_checkers_limit() {
        for kind in ["Pipeline", "Processor"] {
            let mut limits = Vec::new();
            expression_limits(crd_schema(kind).unwrap(), kind, &mut limits);
            assert!(!limits.is_empty(), "{kind}");
            for (field, max) in limits {
                assert_eq!(max, Some(MAX_EXPRESSION_LENGTH as u64), "{field}");
            }
        }
    }
}
