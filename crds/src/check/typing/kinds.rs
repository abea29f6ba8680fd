//! The type lattice: the kinds a value may have, their unions, the types of
//! schema fields, and how messages show them.

use std::fmt;

use crate::schema::FieldType;

/// The scalar kinds, one bit each.
pub(super) const NULL: u16 = 1;
pub(super) const BOOL: u16 = 1 << 1;
pub(super) const INT: u16 = 1 << 2;
pub(super) const UINT: u16 = 1 << 3;
pub(super) const DOUBLE: u16 = 1 << 4;
pub(super) const STRING: u16 = 1 << 5;
pub(super) const BYTES: u16 = 1 << 6;
pub(super) const TIMESTAMP: u16 = 1 << 7;
pub(super) const DURATION: u16 = 1 << 8;
pub(super) const NUMBERS: u16 = INT | UINT | DOUBLE;

/// CEL's names of the scalar kinds, in the order messages list them.
const SCALAR_NAMES: [(u16, &str); 9] = [
    (BOOL, "bool"),
    (INT, "int"),
    (UINT, "uint"),
    (DOUBLE, "double"),
    (STRING, "string"),
    (BYTES, "bytes"),
    (TIMESTAMP, "timestamp"),
    (DURATION, "duration"),
    (NULL, "null"),
];

/// What a map value is known to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MapShape {
    /// The object at this schema path (`""` is the whole event): its members
    /// are the schema's fields under the path.
    Record(String),
    /// A map whose entries are unknown.
    Entries,
}

/// The kinds a value may have at run time. The empty type (no kind) is what
/// nothing evaluates to, such as the elements of `[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Type {
    /// Any value: the checker cannot tell.
    dynamic: bool,
    /// The scalar kinds it may be, a bit each.
    scalars: u16,
    /// The element type, when it may be a list.
    list: Option<Box<Type>>,
    /// What it holds, when it may be a map.
    map: Option<MapShape>,
}

/// One kind of a [`Type`], for operators that are defined per pair of kinds.
#[derive(Clone, Debug)]
pub(super) enum Kind {
    Dyn,
    Scalar(u16),
    List(Type),
    Map(MapShape),
}

impl Type {
    pub(super) fn dynamic() -> Self {
        Self {
            dynamic: true,
            ..Self::default()
        }
    }

    pub(super) fn scalar(bits: u16) -> Self {
        Self {
            scalars: bits,
            ..Self::default()
        }
    }

    pub(super) fn list(element: Type) -> Self {
        Self {
            list: Some(Box::new(element)),
            ..Self::default()
        }
    }

    pub(super) fn map(shape: MapShape) -> Self {
        Self {
            map: Some(shape),
            ..Self::default()
        }
    }

    /// The type of a field declared in a schema; `path` locates an object's members.
    pub(super) fn of_field(field_type: FieldType, optional: bool, path: &str) -> Self {
        let mut ty = match field_type {
            FieldType::String => Self::scalar(STRING),
            FieldType::Integer => Self::scalar(INT),
            // A JSON number is an int when it is integral, a double otherwise.
            FieldType::Number => Self::scalar(INT | DOUBLE),
            FieldType::Boolean => Self::scalar(BOOL),
            // An RFC 3339 string or epoch milliseconds; never a CEL timestamp.
            FieldType::Timestamp => Self::scalar(STRING | INT),
            FieldType::Object => Self::map(MapShape::Record(path.to_owned())),
            FieldType::Array => Self::list(Self::dynamic()),
            FieldType::Any => return Self::dynamic(),
        };
        if optional {
            ty.scalars |= NULL;
        }
        ty
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.dynamic && self.scalars == 0 && self.list.is_none() && self.map.is_none()
    }

    pub(super) fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// Whether a value of this type may be of one of the scalar kinds `bits`.
    pub(super) fn may_be(&self, bits: u16) -> bool {
        self.dynamic || self.scalars & bits != 0
    }

    /// Whether every value of this type is of one of the scalar kinds `bits`.
    pub(super) fn only(&self, bits: u16) -> bool {
        !self.dynamic
            && self.list.is_none()
            && self.map.is_none()
            && self.scalars != 0
            && self.scalars & !bits == 0
    }

    /// Whether every value of it is a scalar of bounded size (a number, bool,
    /// null, timestamp or duration): not a string, bytes, list or map, whose
    /// size only the event bounds.
    pub(super) fn is_small(&self) -> bool {
        !self.dynamic
            && self.list.is_none()
            && self.map.is_none()
            && self.scalars & (STRING | BYTES) == 0
    }

    pub(super) fn may_be_list(&self) -> bool {
        self.dynamic || self.list.is_some()
    }

    pub(super) fn may_be_map(&self) -> bool {
        self.dynamic || self.map.is_some()
    }

    pub(super) fn may_be_bool(&self) -> bool {
        self.may_be(BOOL)
    }

    /// Whether some value of this type has a JSON form (durations and bytes have none).
    pub(super) fn may_have_json_form(&self) -> bool {
        self.dynamic
            || self.list.is_some()
            || self.map.is_some()
            || self.scalars & !(DURATION | BYTES) != 0
    }

    /// Whether every value of it is a number (so a comparison with 0 makes a condition).
    pub(super) fn is_numeric(&self) -> bool {
        self.only(NUMBERS)
    }

    pub(super) fn is_string(&self) -> bool {
        self.only(STRING)
    }

    /// Whether every value of it is a list or a map.
    pub(super) fn is_collection(&self) -> bool {
        !self.dynamic && self.scalars == 0 && (self.list.is_some() || self.map.is_some())
    }

    /// The schema type that declares values of this type, when one does exactly.
    pub(super) fn field_type(&self) -> Option<FieldType> {
        if self.dynamic || self.is_empty() {
            return None;
        }
        let scalars = self.scalars & !NULL;
        match (scalars, &self.list, &self.map) {
            (0, Some(_), None) => Some(FieldType::Array),
            (0, None, Some(_)) => Some(FieldType::Object),
            (bits, None, None) if bits != 0 && bits & !(INT | UINT) == 0 => {
                Some(FieldType::Integer)
            }
            (bits, None, None) if bits != 0 && bits & !NUMBERS == 0 => Some(FieldType::Number),
            (STRING, None, None) => Some(FieldType::String),
            (BOOL, None, None) => Some(FieldType::Boolean),
            (TIMESTAMP, None, None) => Some(FieldType::Timestamp),
            _ => None,
        }
    }

    /// The least type holding the values of both.
    pub(super) fn join(&self, other: &Type) -> Type {
        if self.dynamic || other.dynamic {
            return Type::dynamic();
        }
        let list = match (&self.list, &other.list) {
            (Some(a), Some(b)) => Some(Box::new(a.join(b))),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        let map = match (&self.map, &other.map) {
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            (Some(_), Some(_)) => Some(MapShape::Entries),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Type {
            dynamic: false,
            scalars: self.scalars | other.scalars,
            list,
            map,
        }
    }

    pub(super) fn kinds(&self) -> Vec<Kind> {
        if self.dynamic {
            return vec![Kind::Dyn];
        }
        let mut kinds: Vec<Kind> = SCALAR_NAMES
            .iter()
            .filter(|(bit, _)| self.scalars & bit != 0)
            .map(|(bit, _)| Kind::Scalar(*bit))
            .collect();
        if let Some(element) = &self.list {
            kinds.push(Kind::List((**element).clone()));
        }
        if let Some(shape) = &self.map {
            kinds.push(Kind::Map(shape.clone()));
        }
        kinds
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dynamic {
            return f.write_str("dyn");
        }
        let mut names: Vec<&str> = SCALAR_NAMES
            .iter()
            .filter(|(bit, _)| self.scalars & bit != 0 && *bit != NULL)
            .map(|(_, name)| *name)
            .collect();
        if self.list.is_some() {
            names.push("list");
        }
        if self.map.is_some() {
            names.push("map");
        }
        // Null last: `string or null` reads as an optional string.
        if self.scalars & NULL != 0 {
            names.push("null");
        }
        match names.split_last() {
            None => f.write_str("nothing"),
            Some((last, [])) => f.write_str(last),
            Some((last, rest)) => write!(f, "{} or {last}", rest.join(", ")),
        }
    }
}

/// A type in a message that names two: `(int or string) and timestamp`.
pub(super) fn grouped(ty: &Type) -> String {
    let shown = ty.to_string();
    if shown.contains(" or ") {
        format!("({shown})")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::typed;
    use crate::schema::FieldType;

    #[test]
    fn field_types_of_results() {
        let field_type = |source: &str| typed(source).result.field_type();
        assert_eq!(field_type("count + 1"), Some(FieldType::Integer));
        assert_eq!(field_type("amount"), Some(FieldType::Number));
        assert_eq!(field_type("1.5"), Some(FieldType::Number));
        assert_eq!(field_type("note"), Some(FieldType::String));
        assert_eq!(field_type("timestamp(ts)"), Some(FieldType::Timestamp));
        assert_eq!(field_type("ts"), None);
        assert_eq!(field_type("tags"), Some(FieldType::Array));
        assert_eq!(field_type("customer"), Some(FieldType::Object));
        assert_eq!(field_type("extra"), None);
    }
}
