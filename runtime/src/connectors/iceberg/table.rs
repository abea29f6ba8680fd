//! The table: the contract's columns as an Iceberg schema, `partitionBy` as
//! its partition spec, the table loaded (or created with both), an existing
//! table's schema checked against the columns, and rows shaped as the table
//! has them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray, new_null_array};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema as ArrowSchema};
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::spec::{
    Schema, StructType, Transform as IcebergTransform, Type, UnboundPartitionSpec,
};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::{Catalog, ErrorKind, NamespaceIdent, TableCreation, TableIdent};
use keystone_crds::pipeline::partitioning::{PartitionTerm, Transform};

use crate::connectors::lake::LakeError;
use crate::connectors::lake::columns::{Column, ColumnKind};
use keystone_lake::iceberg_schema::{
    missing_optional, nested_fields, primitive, schema_of, takes_rows,
};

/// The table a sink writes: its name and what the contract asks of it.
pub struct TableSpec {
    pub ident: TableIdent,
    pub columns: Arc<Vec<Column>>,
    pub terms: Vec<PartitionTerm>,
}

impl TableSpec {
    pub fn new(
        namespace: &str,
        table: &str,
        columns: Arc<Vec<Column>>,
        partition_by: &[String],
    ) -> Result<TableSpec, LakeError> {
        let invalid = |message: String| LakeError::Path {
            path: format!("{namespace}.{table}"),
            message,
        };
        let levels: Vec<String> = namespace.split('.').map(str::to_owned).collect();
        if levels.iter().any(String::is_empty) || table.is_empty() {
            return Err(invalid(
                "namespace and table must be non-empty names (levels of a namespace joined by '.')"
                    .to_owned(),
            ));
        }
        let namespace = NamespaceIdent::from_vec(levels).map_err(|e| invalid(e.to_string()))?;
        let terms = partition_by
            .iter()
            .enumerate()
            .map(|(index, text)| {
                PartitionTerm::parse(text).map_err(|message| LakeError::Partition {
                    index,
                    term: text.clone(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = TableSpec {
            ident: TableIdent::new(namespace, table.to_owned()),
            columns,
            terms,
        };
        // Refuse terms the contract cannot feed now, not at the first create.
        spec.partition_spec(&spec.schema()?)?;
        Ok(spec)
    }

    /// `namespace.table`, for messages.
    pub fn show(&self) -> String {
        format!(
            "{}.{}",
            self.ident.namespace().clone().inner().join("."),
            self.ident.name()
        )
    }

    fn table_error(&self, message: String) -> LakeError {
        LakeError::Table {
            table: self.show(),
            message,
        }
    }

    /// The Iceberg schema of the columns (field ids assigned depth first; a
    /// catalog may assign its own, and the table's are the ones written).
    pub fn schema(&self) -> Result<Schema, LakeError> {
        schema_of(&self.columns).map_err(|source| LakeError::Iceberg {
            what: format!("the schema of table {}", self.show()),
            source: Box::new(source),
        })
    }

    /// The partition spec of `partitionBy` over `schema`, with spec id 0 (a
    /// REST catalog refuses a new table's spec without one).
    pub fn partition_spec(&self, schema: &Schema) -> Result<UnboundPartitionSpec, LakeError> {
        let mut builder = UnboundPartitionSpec::builder().with_spec_id(0);
        for (index, term) in self.terms.iter().enumerate() {
            let refuse = |message: String| LakeError::Partition {
                index,
                term: term.to_string(),
                message,
            };
            let Some(source) = schema.field_by_name(&term.field) else {
                return Err(refuse(format!(
                    "{} is not a column of the table (the output contract does not list it)",
                    term.field
                )));
            };
            let (transform, name) = match term.transform {
                Transform::Identity => (IcebergTransform::Identity, term.field.clone()),
                Transform::Year => (IcebergTransform::Year, format!("{}_year", term.field)),
                Transform::Month => (IcebergTransform::Month, format!("{}_month", term.field)),
                Transform::Day => (IcebergTransform::Day, format!("{}_day", term.field)),
                Transform::Hour => (IcebergTransform::Hour, format!("{}_hour", term.field)),
                Transform::Bucket(n) => (
                    IcebergTransform::Bucket(n),
                    format!("{}_bucket_{n}", term.field),
                ),
            };
            if transform.result_type(&source.field_type).is_err() {
                return Err(refuse(format!(
                    "{transform} cannot partition {}, a {} column",
                    term.field, source.field_type
                )));
            }
            // Names follow Iceberg's Java defaults (`at_day`, `id_bucket_16`).
            builder = builder
                .add_partition_field(source.id, name, transform)
                .map_err(|e| refuse(e.message().to_owned()))?;
        }
        Ok(builder.build())
    }

    /// Loads the table, creating it (and its namespace) when missing; checks
    /// that it can take the contract's rows.
    pub async fn open(&self, catalog: &dyn Catalog) -> Result<Table, LakeError> {
        let call = |what: &str| {
            let what = format!("{what} {}", self.show());
            move |source| LakeError::Iceberg {
                what,
                source: Box::new(source),
            }
        };
        let table = match catalog.load_table(&self.ident).await {
            Ok(table) => table,
            Err(e) if is_missing(e.kind()) => self.create(catalog).await?,
            Err(e) => return Err(call("loading table")(e)),
        };
        let table = self.add_new_columns(catalog, table).await?;
        self.check(&table)?;
        Ok(table)
    }

    /// Schema evolution: the contract's optional fields the table lacks
    /// become optional columns (the rows already there read them as null).
    /// A missing required field is left to `check`, which refuses it.
    async fn add_new_columns(
        &self,
        catalog: &dyn Catalog,
        table: Table,
    ) -> Result<Table, LakeError> {
        let missing = missing_optional(
            &self.columns,
            table.metadata().current_schema().as_struct(),
            None,
        );
        if missing.is_empty() {
            return Ok(table);
        }
        let names: Vec<&str> = missing.iter().map(|(_, c)| c.path.as_str()).collect();
        let transaction = Transaction::new(&table);
        let mut action = transaction.update_schema();
        for (parent, column) in &missing {
            let field_type = match &column.kind {
                ColumnKind::Struct(members) => {
                    // Ids are placeholders: the commit assigns fresh ones.
                    Type::Struct(StructType::new(nested_fields(members, &mut 0)))
                }
                kind => Type::Primitive(primitive(kind)),
            };
            let add = match parent {
                Some(parent) => AddColumn::builder()
                    .parent(parent.clone())
                    .name(column.name.clone())
                    .field_type(field_type)
                    .build(),
                None => AddColumn::optional(&column.name, field_type),
            };
            action = action.add_column(add);
        }
        let committed = match action.apply(transaction) {
            Ok(transaction) => transaction.commit(catalog).await,
            Err(e) => Err(e),
        };
        match committed {
            Ok(table) => {
                tracing::info!(table = %self.show(), columns = ?names, "added the contract's new optional columns to the table");
                Ok(table)
            }
            // Another instance may have added them first: read the table
            // again, and `check` says whether it fits now.
            Err(error) => {
                tracing::info!(table = %self.show(), columns = ?names, %error, "adding columns failed; reading the table again");
                catalog
                    .load_table(&self.ident)
                    .await
                    .map_err(|source| LakeError::Iceberg {
                        what: format!("loading table {}", self.show()),
                        source: Box::new(source),
                    })
            }
        }
    }

    async fn create(&self, catalog: &dyn Catalog) -> Result<Table, LakeError> {
        let namespace = self.ident.namespace();
        let show_namespace = namespace.clone().inner().join(".");
        let exists = catalog
            .namespace_exists(namespace)
            .await
            .map_err(|source| LakeError::Iceberg {
                what: format!("looking up namespace {show_namespace}"),
                source: Box::new(source),
            })?;
        if !exists {
            match catalog.create_namespace(namespace, HashMap::new()).await {
                Ok(_) => {
                    tracing::info!(namespace = %show_namespace, "created the Iceberg namespace")
                }
                // Another instance created it first.
                Err(e) if e.kind() == ErrorKind::NamespaceAlreadyExists => {}
                Err(source) => {
                    return Err(LakeError::Iceberg {
                        what: format!("creating namespace {show_namespace}"),
                        source: Box::new(source),
                    });
                }
            }
        }
        let schema = self.schema()?;
        let spec = self.partition_spec(&schema)?;
        let creation = TableCreation::builder()
            .name(self.ident.name().to_owned())
            .schema(schema)
            .partition_spec(spec)
            .build();
        match catalog.create_table(namespace, creation).await {
            Ok(table) => {
                tracing::info!(table = %self.show(), location = table.metadata().location(), "created the Iceberg table from the output contract");
                Ok(table)
            }
            // Another instance created it first: take theirs (checked next).
            Err(e) if e.kind() == ErrorKind::TableAlreadyExists => catalog
                .load_table(&self.ident)
                .await
                .map_err(|source| LakeError::Iceberg {
                    what: format!("loading table {}", self.show()),
                    source: Box::new(source),
                }),
            Err(source) => Err(LakeError::Iceberg {
                what: format!("creating table {}", self.show()),
                source: Box::new(source),
            }),
        }
    }

    /// Whether `table` can take the contract's rows: every column there with
    /// the same type, required only where the contract requires it, and no
    /// required column the contract lacks.
    pub fn check(&self, table: &Table) -> Result<(), LakeError> {
        let schema = table.metadata().current_schema();
        takes_rows(&self.columns, schema.as_struct()).map_err(|m| self.table_error(m))?;
        let spec = table.metadata().default_partition_spec();
        let wanted: Vec<String> = self.terms.iter().map(ToString::to_string).collect();
        let has: Vec<String> = spec
            .fields()
            .iter()
            .map(|f| {
                let source = schema
                    .name_by_field_id(f.source_id)
                    .unwrap_or("?")
                    .to_owned();
                match f.transform {
                    IcebergTransform::Identity => source,
                    IcebergTransform::Bucket(n) => format!("bucket({n}, {source})"),
                    other => format!("{other}({source})"),
                }
            })
            .collect();
        if wanted != has {
            // The table's own spec is the one its files follow.
            tracing::warn!(table = %self.show(), partition_by = ?wanted, table_spec = ?has, "the existing table is partitioned otherwise than partitionBy; writing with the table's spec");
        }
        Ok(())
    }
}

fn is_missing(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::TableNotFound | ErrorKind::NamespaceNotFound
    )
}

/// Rows of the contract's shape as the table has them: its column order,
/// its field ids (which the Parquet writer records), and nulls for optional
/// columns the contract lacks. The types were checked with the table.
pub struct Shape {
    pub schema: Arc<ArrowSchema>,
}

impl Shape {
    pub fn of(table: &Table) -> Result<Shape, LakeError> {
        let schema =
            schema_to_arrow_schema(table.metadata().current_schema()).map_err(|source| {
                LakeError::Iceberg {
                    what: "the table's schema as Arrow".to_owned(),
                    source: Box::new(source),
                }
            })?;
        Ok(Shape {
            schema: Arc::new(schema),
        })
    }

    pub fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let columns = conform_members(
            batch.schema().fields(),
            batch.columns(),
            self.schema.fields(),
            batch.num_rows(),
        )?;
        RecordBatch::try_new(self.schema.clone(), columns)
    }
}

fn conform_members(
    from: &Fields,
    arrays: &[ArrayRef],
    to: &Fields,
    rows: usize,
) -> Result<Vec<ArrayRef>, ArrowError> {
    to.iter()
        .map(|field| match from.find(field.name()) {
            Some((i, _)) => conform_array(&arrays[i], field),
            None => Ok(new_null_array(field.data_type(), rows)),
        })
        .collect()
}

fn conform_array(array: &ArrayRef, to: &Field) -> Result<ArrayRef, ArrowError> {
    let DataType::Struct(members) = to.data_type() else {
        return Ok(array.clone());
    };
    let Some(from) = array.as_struct_opt() else {
        return Err(ArrowError::SchemaError(format!(
            "column {} is not a struct in the rows",
            to.name()
        )));
    };
    let children = conform_members(from.fields(), from.columns(), members, from.len())?;
    Ok(Arc::new(StructArray::try_new(
        members.clone(),
        children,
        from.nulls().cloned(),
    )?))
}
