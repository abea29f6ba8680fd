//! The typer: the types of literals, variables, members and indexes, and the
//! failures it collects; calls and comprehensions have their own modules.

use std::collections::HashMap;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};

use super::kinds::{
    BOOL, BYTES, DOUBLE, INT, Kind, MapShape, NULL, NUMBERS, STRING, Type, UINT, grouped,
};
use super::source::show;
use crate::check::expressions::EVENT_VARIABLE;
use crate::schema::Schema;

/// A part of an expression that fails whenever it is evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Failure {
    /// The part, as CEL source.
    pub(super) at: String,
    /// Why it fails, for the user.
    pub(super) why: String,
}

/// What the checker learnt about one expression.
pub(super) struct Typed {
    /// The type of its result.
    pub(super) result: Type,
    /// The parts that fail whenever they are evaluated. A part may still be
    /// skipped (`false && x`), so these are mistakes, not certain failures of
    /// the whole expression.
    pub(super) failures: Vec<Failure>,
    /// The type of every part, by node id (a comprehension's parts as its
    /// last, widest round typed them), for the cost estimate.
    pub(super) types: HashMap<u64, Type>,
}

/// Types `expression` over events of `schema`: top-level fields are variables,
/// and `event` is the whole event unless a field has that name.
pub(super) fn type_of(expression: &IdedExpr, schema: &Schema) -> Typed {
    let mut typer = Typer {
        schema,
        scopes: Vec::new(),
        failures: Vec::new(),
        types: HashMap::new(),
    };
    let result = typer.infer(expression);
    Typed {
        result,
        failures: typer.failures,
        types: typer.types,
    }
}

pub(super) struct Typer<'s> {
    schema: &'s Schema,
    /// Comprehension variables in scope, innermost last.
    pub(super) scopes: Vec<(String, Type)>,
    failures: Vec<Failure>,
    types: HashMap<u64, Type>,
}

impl Typer<'_> {
    pub(super) fn fail(&mut self, expression: &IdedExpr, why: String) -> Type {
        let failure = Failure {
            at: show(expression),
            why,
        };
        // Comprehension steps are typed more than once; say each failure once.
        if !self.failures.contains(&failure) {
            self.failures.push(failure);
        }
        // The failure is reported; what follows from it would only repeat it.
        Type::dynamic()
    }

    pub(super) fn infer(&mut self, expression: &IdedExpr) -> Type {
        let ty = self.infer_part(expression);
        self.types.insert(expression.id, ty.clone());
        ty
    }

    fn infer_part(&mut self, expression: &IdedExpr) -> Type {
        match &expression.expr {
            Expr::Literal(literal) => Type::scalar(match literal {
                LiteralValue::Boolean(_) => BOOL,
                LiteralValue::Bytes(_) => BYTES,
                LiteralValue::Double(_) => DOUBLE,
                LiteralValue::Int(_) => INT,
                LiteralValue::Null => NULL,
                LiteralValue::String(_) => STRING,
                LiteralValue::UInt(_) => UINT,
            }),
            Expr::Ident(name) => self.variable(name),
            Expr::Select(select) => {
                let operand = self.infer(&select.operand);
                if select.test {
                    return Type::scalar(BOOL);
                }
                self.member(expression, &operand, &select.field)
            }
            Expr::Call(call) => self.call(expression, call),
            Expr::List(list) => {
                let mut element = Type::default();
                for item in &list.elements {
                    element = element.join(&self.infer(item));
                }
                Type::list(element)
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.infer(&entry.key);
                        self.infer(&entry.value);
                    }
                }
                Type::map(MapShape::Entries)
            }
            Expr::Comprehension(comprehension) => self.comprehension(expression, comprehension),
            Expr::Struct(_) | Expr::Unspecified => Type::dynamic(),
        }
    }

    fn variable(&self, name: &str) -> Type {
        if let Some((_, ty)) = self.scopes.iter().rev().find(|(bound, _)| bound == name) {
            return ty.clone();
        }
        match self.schema.get(name) {
            Some(info) => Type::of_field(info.field_type, info.optional, name),
            None if name == EVENT_VARIABLE => Type::map(MapShape::Record(String::new())),
            // Unknown fields are the requirements' to report.
            None => Type::dynamic(),
        }
    }

    /// The member `field` of a value of type `operand`, or the failure to select it.
    fn member(&mut self, expression: &IdedExpr, operand: &Type, field: &str) -> Type {
        if operand.is_empty() {
            return Type::dynamic();
        }
        let mut result = Type::default();
        let mut selectable = false;
        for kind in operand.kinds() {
            match kind {
                Kind::Dyn | Kind::Map(MapShape::Entries) => return Type::dynamic(),
                Kind::Map(MapShape::Record(path)) => {
                    selectable = true;
                    result = result.join(&self.record_member(&path, field));
                }
                Kind::Scalar(_) | Kind::List(_) => {}
            }
        }
        if selectable {
            result
        } else {
            self.fail(expression, format!("{} has no fields", grouped(operand)))
        }
    }

    /// The type of member `field` of the object at schema path `path`.
    fn record_member(&self, path: &str, field: &str) -> Type {
        let member = if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        match self.schema.get(&member) {
            Some(info) => Type::of_field(info.field_type, info.optional, &member),
            // An open schema's objects, and objects whose members are not
            // listed, may carry it; whether a closed one does is the
            // requirements' question, not a type.
            None => Type::dynamic(),
        }
    }

    pub(super) fn index(
        &mut self,
        expression: &IdedExpr,
        operand: &IdedExpr,
        key: &IdedExpr,
    ) -> Type {
        let container = self.infer(operand);
        let key_type = self.infer(key);
        if container.is_empty() || key_type.is_empty() {
            return Type::dynamic();
        }
        let literal_key = match &key.expr {
            Expr::Literal(LiteralValue::String(name)) => Some(name.inner().to_owned()),
            _ => None,
        };
        let mut result: Option<Type> = None;
        let mut add = |ty: Type| result = Some(result.take().map_or(ty.clone(), |r| r.join(&ty)));
        for kind in container.kinds() {
            match kind {
                Kind::Dyn | Kind::Map(MapShape::Entries) => return Type::dynamic(),
                Kind::Map(MapShape::Record(path)) => match &literal_key {
                    Some(field) => add(self.record_member(&path, field)),
                    None => return Type::dynamic(),
                },
                // Lists take any number as an index.
                Kind::List(element) if key_type.may_be(NUMBERS) => add(element),
                Kind::List(_) | Kind::Scalar(_) => {}
            }
        }
        match result {
            Some(ty) => ty,
            None => self.fail(
                expression,
                format!(
                    "{} cannot be indexed with {}",
                    grouped(&container),
                    grouped(&key_type)
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{failure, ty};
    use super::type_of;
    use crate::schema::{FieldSpec, FieldType, Schema, SchemaSpec};

    #[test]
    fn fields_have_their_schema_types() {
        assert_eq!(ty("name"), "string");
        assert_eq!(ty("count"), "int");
        assert_eq!(ty("amount"), "int or double");
        assert_eq!(ty("paid"), "bool");
        assert_eq!(ty("ts"), "int or string");
        assert_eq!(ty("tags"), "list");
        assert_eq!(ty("extra"), "dyn");
        assert_eq!(ty("customer"), "map");
        // Unknown fields are for the requirements to report.
        assert_eq!(ty("unknown"), "dyn");
    }

    #[test]
    fn optional_fields_may_be_null() {
        assert_eq!(ty("note"), "string or null");
        assert_eq!(ty("customer.tier"), "string or null");
        assert_eq!(ty("note == null ? 'none' : note"), "string or null");
    }

    #[test]
    fn nested_fields_are_looked_up_by_path() {
        assert_eq!(ty("customer.id"), "string");
        assert_eq!(ty("customer.address.zip"), "int");
        assert_eq!(ty("customer['id']"), "string");
        // Open objects may carry unlisted members.
        assert_eq!(ty("customer.other"), "dyn");
        assert_eq!(ty("extra.anything.deep"), "dyn");
        assert_eq!(failure("name.first"), "name.first: string has no fields");
    }

    #[test]
    fn event_is_the_whole_event() {
        assert_eq!(ty("event.count"), "int");
        assert_eq!(ty("event['customer'].id"), "string");
        assert_eq!(ty("event.unlisted"), "dyn");
        assert_eq!(ty("event"), "map");
        let with_event_field = Schema::from_spec(&SchemaSpec {
            fields: vec![FieldSpec {
                name: "event".to_owned(),
                field_type: FieldType::String,
                optional: false,
                description: None,
            }],
            open: true,
        });
        let program = cel::Program::compile("event").unwrap();
        assert_eq!(
            type_of(program.expression(), &with_event_field)
                .result
                .to_string(),
            "string"
        );
    }

    #[test]
    fn literals_lists_and_maps() {
        assert_eq!(ty("1"), "int");
        assert_eq!(ty("1u"), "uint");
        assert_eq!(ty("1.0"), "double");
        assert_eq!(ty("'x'"), "string");
        assert_eq!(ty("b'x'"), "bytes");
        assert_eq!(ty("null"), "null");
        assert_eq!(ty("true"), "bool");
        assert_eq!(ty("[1, 2]"), "list");
        assert_eq!(ty("[1, 2][0]"), "int");
        assert_eq!(ty("{'a': 1}"), "map");
        assert_eq!(ty("{'a': 1}['a']"), "dyn");
        assert_eq!(ty("tags[0]"), "dyn");
        assert_eq!(ty("name in ['a', 'b']"), "bool");
        assert_eq!(
            failure("name[0]"),
            "name[0]: string cannot be indexed with int"
        );
        assert_eq!(
            failure("'a' in name"),
            "\"a\" in name: in needs a list or a map on its right, not string"
        );
    }
}
