//! The Iceberg schema of a contract's columns, and whether an existing
//! table's schema takes the contract's rows.

use std::sync::Arc;

use iceberg::spec::{NestedField, NestedFieldRef, PrimitiveType, Schema, StructType, Type};

use crate::columns::{Column, ColumnKind};

/// The Iceberg schema of `columns` (field ids assigned depth first; a
/// catalog may assign its own, and the table's are the ones written).
pub fn schema_of(columns: &[Column]) -> Result<Schema, iceberg::Error> {
    let mut next_id = 0;
    Schema::builder()
        .with_schema_id(0)
        .with_fields(nested_fields(columns, &mut next_id))
        .build()
}

/// The fields of `columns`, ids counted on from `next_id`.
pub fn nested_fields(columns: &[Column], next_id: &mut i32) -> Vec<NestedFieldRef> {
    columns
        .iter()
        .map(|column| {
            *next_id += 1;
            let id = *next_id;
            let field_type = match &column.kind {
                ColumnKind::Struct(members) => {
                    Type::Struct(StructType::new(nested_fields(members, next_id)))
                }
                kind => Type::Primitive(primitive(kind)),
            };
            Arc::new(NestedField::new(
                id,
                &column.name,
                field_type,
                !column.optional,
            ))
        })
        .collect()
}

/// The Iceberg type of a column that is not a struct.
pub fn primitive(kind: &ColumnKind) -> PrimitiveType {
    match kind {
        ColumnKind::String | ColumnKind::Json => PrimitiveType::String,
        ColumnKind::Long => PrimitiveType::Long,
        ColumnKind::Double => PrimitiveType::Double,
        ColumnKind::Boolean => PrimitiveType::Boolean,
        ColumnKind::Timestamp => PrimitiveType::Timestamptz,
        // Structs are not primitive; `nested_fields` handles them.
        ColumnKind::Struct(_) => PrimitiveType::String,
    }
}

fn type_name(kind: &ColumnKind) -> &'static str {
    match kind {
        ColumnKind::String | ColumnKind::Json => "string",
        ColumnKind::Long => "long",
        ColumnKind::Double => "double",
        ColumnKind::Boolean => "boolean",
        ColumnKind::Timestamp => "timestamptz",
        ColumnKind::Struct(_) => "struct",
    }
}

/// The optional columns of `columns` that `table` (a struct at `parent`)
/// lacks, with the dotted path of the struct they go in: the columns schema
/// evolution adds.
pub fn missing_optional<'c>(
    columns: &'c [Column],
    table: &StructType,
    parent: Option<&str>,
) -> Vec<(Option<String>, &'c Column)> {
    let mut missing = Vec::new();
    for column in columns {
        match (table.field_by_name(&column.name), &column.kind) {
            (None, _) if column.optional => missing.push((parent.map(str::to_owned), column)),
            (Some(field), ColumnKind::Struct(members)) => {
                if let Type::Struct(nested) = field.field_type.as_ref() {
                    missing.extend(missing_optional(members, nested, Some(&column.path)));
                }
            }
            _ => {}
        }
    }
    missing
}

/// Whether a table of schema `table` takes the contract's rows as it is:
/// every column there with the same type, required only where the contract
/// requires it, and no required column the contract lacks.
pub fn takes_rows(columns: &[Column], table: &StructType) -> Result<(), String> {
    check_struct(columns, table, "", false)
}

/// Whether a table of schema `table` takes the contract's rows once the sink
/// has added the contract's optional columns it lacks (schema evolution);
/// the dotted paths of those columns if so, why not otherwise.
pub fn takes_rows_after_evolution(
    columns: &[Column],
    table: &StructType,
) -> Result<Vec<String>, String> {
    check_struct(columns, table, "", true)?;
    Ok(missing_optional(columns, table, None)
        .into_iter()
        .map(|(_, column)| column.path.clone())
        .collect())
}

/// Why the columns cannot be written into `table` (members of `parent`);
/// with `evolving`, a missing optional column is one the sink adds.
fn check_struct(
    columns: &[Column],
    table: &StructType,
    parent: &str,
    evolving: bool,
) -> Result<(), String> {
    for column in columns {
        let Some(field) = table.field_by_name(&column.name) else {
            if evolving && column.optional {
                continue;
            }
            return Err(format!(
                "the output contract's field {} has no column in the table; add it ({}) or leave it out of the contract",
                column.path,
                type_name(&column.kind)
            ));
        };
        match (&column.kind, field.field_type.as_ref()) {
            (ColumnKind::Struct(members), Type::Struct(nested)) => {
                check_struct(members, nested, &column.path, evolving)?;
            }
            (kind, Type::Primitive(p))
                if !matches!(kind, ColumnKind::Struct(_)) && *p == primitive(kind) => {}
            (kind, other) => {
                return Err(format!(
                    "column {} is {other} in the table, but the output contract makes it {}",
                    column.path,
                    type_name(kind)
                ));
            }
        }
        if field.required && column.optional {
            return Err(format!(
                "column {} is required in the table, but the output contract marks it optional: events without it could not be written",
                column.path
            ));
        }
    }
    for field in table.fields() {
        if field.required && !columns.iter().any(|c| c.name == field.name) {
            let path = if parent.is_empty() {
                field.name.clone()
            } else {
                format!("{parent}.{}", field.name)
            };
            return Err(format!(
                "column {path} is required in the table, but the output contract does not list it"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, kind: ColumnKind, optional: bool) -> Column {
        Column {
            name: name.to_owned(),
            path: name.to_owned(),
            kind,
            optional,
            description: None,
        }
    }

    fn contract() -> Vec<Column> {
        vec![
            column("id", ColumnKind::String, false),
            column("amount", ColumnKind::Double, true),
            column(
                "device",
                ColumnKind::Struct(vec![Column {
                    name: "os".to_owned(),
                    path: "device.os".to_owned(),
                    kind: ColumnKind::String,
                    optional: true,
                    description: None,
                }]),
                true,
            ),
        ]
    }

    fn table(fields: Vec<NestedFieldRef>) -> StructType {
        StructType::new(fields)
    }

    fn field(id: i32, name: &str, ty: Type, required: bool) -> NestedFieldRef {
        Arc::new(NestedField::new(id, name, ty, required))
    }

    #[test]
    fn the_contracts_own_schema_takes_its_rows() {
        let columns = contract();
        let schema = schema_of(&columns).expect("schema");
        assert_eq!(takes_rows(&columns, schema.as_struct()), Ok(()));
        assert_eq!(
            takes_rows_after_evolution(&columns, schema.as_struct()),
            Ok(vec![])
        );
        let os = schema.field_by_name("device.os").expect("nested member");
        assert!(!os.required);
        assert!(schema.field_by_name("id").expect("id").required);
    }

    #[test]
    fn missing_optional_columns_are_added_but_not_taken_as_they_are() {
        let columns = contract();
        let only_id = table(vec![field(
            1,
            "id",
            Type::Primitive(PrimitiveType::String),
            true,
        )]);
        assert_eq!(
            takes_rows_after_evolution(&columns, &only_id),
            Ok(vec!["amount".to_owned(), "device".to_owned()])
        );
        let refused = takes_rows(&columns, &only_id).expect_err("amount is missing");
        assert!(refused.contains("amount has no column"), "{refused}");
    }

    #[test]
    fn a_missing_required_column_is_refused_even_with_evolution() {
        let columns = contract();
        let without_id = table(vec![field(
            1,
            "amount",
            Type::Primitive(PrimitiveType::Double),
            false,
        )]);
        let refused = takes_rows_after_evolution(&columns, &without_id).expect_err("id");
        assert!(refused.contains("field id has no column"), "{refused}");
    }

    #[test]
    fn another_type_names_the_column_and_both_types() {
        let columns = contract();
        let string_amount = table(vec![
            field(1, "id", Type::Primitive(PrimitiveType::String), true),
            field(2, "amount", Type::Primitive(PrimitiveType::String), false),
        ]);
        let refused = takes_rows_after_evolution(&columns, &string_amount).expect_err("type");
        assert_eq!(
            refused,
            "column amount is string in the table, but the output contract makes it double"
        );
    }

    #[test]
    fn required_columns_the_contract_lacks_or_makes_optional_are_refused() {
        let columns = contract();
        let extra_required = table(vec![
            field(1, "id", Type::Primitive(PrimitiveType::String), true),
            field(2, "region", Type::Primitive(PrimitiveType::String), true),
        ]);
        let refused = takes_rows_after_evolution(&columns, &extra_required).expect_err("region");
        assert!(
            refused.contains("column region is required in the table"),
            "{refused}"
        );
        let required_amount = table(vec![
            field(1, "id", Type::Primitive(PrimitiveType::String), true),
            field(2, "amount", Type::Primitive(PrimitiveType::Double), true),
        ]);
        let refused = takes_rows_after_evolution(&columns, &required_amount).expect_err("amount");
        assert!(refused.contains("marks it optional"), "{refused}");
    }

    #[test]
    fn nested_members_are_checked_by_their_dotted_path() {
        let columns = contract();
        let long_os = table(vec![
            field(1, "id", Type::Primitive(PrimitiveType::String), true),
            field(
                2,
                "device",
                Type::Struct(StructType::new(vec![field(
                    3,
                    "os",
                    Type::Primitive(PrimitiveType::Long),
                    false,
                )])),
                false,
            ),
        ]);
        let refused = takes_rows_after_evolution(&columns, &long_os).expect_err("device.os");
        assert!(refused.starts_with("column device.os is long"), "{refused}");
    }
}
