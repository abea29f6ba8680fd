//! The check of the Iceberg tables a pipeline's sinks write into, made with
//! the contracts' check: an existing table whose schema cannot take the
//! output contract's rows is refused before anything is deployed, by the
//! same rules the sink writes by (`keystone_lake::iceberg_schema`).
//!
//! The operator asks the catalog without credentials: it never reads the
//! Secrets of sinks (they reach the sink's pods only). A catalog that wants
//! them, or does not answer, leaves the table unchecked; the sink then checks
//! it when it starts, and the condition says so.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use iceberg::io::MemoryStorageFactory;
use iceberg::{Catalog, CatalogBuilder, ErrorKind, NamespaceIdent, TableIdent};
use iceberg_catalog_rest::{
    REST_CATALOG_PROP_URI, REST_CATALOG_PROP_WAREHOUSE, RestCatalogBuilder,
};
use keystone_crds::Plan;
use keystone_crds::pipeline::{IcebergCatalogType, IcebergSinkSpec};
use keystone_lake::columns::columns_of;
use keystone_lake::iceberg_schema::takes_rows_after_evolution;

/// How long one catalog may take to answer before its table counts as unchecked.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(5);

/// What the check found of one sink's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableCheck {
    /// The table takes the contract's rows; `adds` are the optional columns
    /// the sink adds first (schema evolution).
    Fits {
        sink: String,
        table: String,
        adds: Vec<String>,
    },
    /// No such table yet: the sink creates it from the contract.
    Absent { sink: String, table: String },
    /// The table cannot take the contract's rows, and why.
    Incompatible {
        sink: String,
        table: String,
        reason: String,
    },
    /// The catalog did not tell (unreachable, or wants credentials).
    Unchecked {
        sink: String,
        table: String,
        why: String,
    },
}

impl TableCheck {
    pub fn is_incompatible(&self) -> bool {
        matches!(self, TableCheck::Incompatible { .. })
    }

    /// Whether the check should be made again later on its own: nothing in
    /// Kubernetes changes when a table is fixed or a catalog comes back.
    pub fn wants_recheck(&self) -> bool {
        matches!(
            self,
            TableCheck::Incompatible { .. } | TableCheck::Unchecked { .. }
        )
    }
}

impl fmt::Display for TableCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableCheck::Fits { sink, table, adds } if adds.is_empty() => {
                write!(f, "sink {sink}: table {table} takes the contract's rows")
            }
            TableCheck::Fits { sink, table, adds } => write!(
                f,
                "sink {sink}: table {table} takes the contract's rows once the sink adds the optional column(s) {}",
                adds.join(", ")
            ),
            TableCheck::Absent { sink, table } => write!(
                f,
                "sink {sink}: table {table} does not exist yet; the sink creates it from the contract"
            ),
            TableCheck::Incompatible {
                sink,
                table,
                reason,
            } => write!(
                f,
                "sink {sink}: table {table} cannot take the output contract's rows: {reason}"
            ),
            TableCheck::Unchecked { sink, table, why } => write!(
                f,
                "sink {sink}: table {table} not checked ({why}); the sink checks it when it starts"
            ),
        }
    }
}

/// Checks the table of every Iceberg sink of `plan` against the schema that
/// reaches the sink.
pub async fn check_tables(plan: &Plan) -> Vec<TableCheck> {
    let mut checks = Vec::new();
    for sink in &plan.sinks {
        let Some(iceberg) = &sink.spec.iceberg else {
            continue;
        };
        // The contracts' check refuses other catalogs and contracts without fields.
        let Ok(columns) = columns_of(&sink.schema) else {
            continue;
        };
        if iceberg.catalog.catalog_type != IcebergCatalogType::Rest {
            continue;
        }
        let table = format!("{}.{}", iceberg.namespace, iceberg.table);
        let sink = sink.name.clone();
        let check = match load_schema(iceberg).await {
            Ok(None) => TableCheck::Absent { sink, table },
            Ok(Some(schema)) => match takes_rows_after_evolution(&columns, schema.as_struct()) {
                Ok(adds) => TableCheck::Fits { sink, table, adds },
                Err(reason) => TableCheck::Incompatible {
                    sink,
                    table,
                    reason,
                },
            },
            Err(why) => TableCheck::Unchecked { sink, table, why },
        };
        checks.push(check);
    }
    checks
}

/// The table's current schema, `None` when the table (or its namespace) does
/// not exist, or why the catalog did not tell.
async fn load_schema(
    iceberg: &IcebergSinkSpec,
) -> Result<Option<iceberg::spec::SchemaRef>, String> {
    let catalog = &iceberg.catalog;
    let props = HashMap::from([
        (REST_CATALOG_PROP_URI.to_owned(), catalog.uri.clone()),
        (
            REST_CATALOG_PROP_WAREHOUSE.to_owned(),
            catalog.warehouse.clone(),
        ),
    ]);
    let levels: Vec<String> = iceberg.namespace.split('.').map(str::to_owned).collect();
    let namespace = NamespaceIdent::from_vec(levels).map_err(|e| e.to_string())?;
    let ident = TableIdent::new(namespace, iceberg.table.clone());
    // Only the table's metadata is read, which comes in the catalog's answer:
    // no data file is opened, so no object store is configured.
    let rest = RestCatalogBuilder::default()
        .with_storage_factory(Arc::new(MemoryStorageFactory))
        .load("keystone-operator", props)
        .await
        .map_err(|e| format!("the catalog at {}: {e}", catalog.uri))?;
    match tokio::time::timeout(CATALOG_TIMEOUT, rest.load_table(&ident)).await {
        Err(_) => Err(format!(
            "the catalog at {} did not answer within {} s",
            catalog.uri,
            CATALOG_TIMEOUT.as_secs()
        )),
        Ok(Ok(table)) => Ok(Some(table.metadata().current_schema().clone())),
        Ok(Err(e))
            if matches!(
                e.kind(),
                ErrorKind::TableNotFound | ErrorKind::NamespaceNotFound
            ) =>
        {
            Ok(None)
        }
        Ok(Err(e)) => Err(format!("the catalog at {}: {e}", catalog.uri)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(catalog: &str) -> Plan {
        let pipeline: keystone_crds::Pipeline = serde_yaml_ng::from_str(&format!(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: n}}
spec:
  source: {{topic: in, schema: {{fields: [{{name: id, type: string}}]}}}}
  sinks:
    - {{name: events, kafka: {{topic: out}}}}
    - name: warehouse
      iceberg:
        catalog: {{type: rest, uri: "{catalog}", warehouse: "file:///lake"}}
        namespace: shop
        table: orders
"#
        ))
        .expect("pipeline");
        keystone_crds::compile(&pipeline, &[]).expect("valid")
    }

    #[tokio::test]
    async fn a_catalog_that_does_not_answer_leaves_the_table_unchecked_and_rechecked() {
        // Nothing listens on port 1: the connection is refused at once.
        let checks = check_tables(&plan("http://127.0.0.1:1")).await;
        assert_eq!(checks.len(), 1, "only the Iceberg sink: {checks:?}");
        let TableCheck::Unchecked { sink, table, why } = &checks[0] else {
            panic!("{checks:?}");
        };
        assert_eq!(
            (sink.as_str(), table.as_str()),
            ("warehouse", "shop.orders")
        );
        assert!(why.contains("http://127.0.0.1:1"), "{why}");
        assert!(checks[0].wants_recheck() && !checks[0].is_incompatible());
        assert!(
            checks[0]
                .to_string()
                .ends_with("; the sink checks it when it starts"),
            "{}",
            checks[0]
        );
    }

    #[test]
    fn the_outcomes_read_as_sentences_naming_sink_and_table() {
        let fits = TableCheck::Fits {
            sink: "w".into(),
            table: "shop.orders".into(),
            adds: vec!["amount".into(), "device.os".into()],
        };
        assert_eq!(
            fits.to_string(),
            "sink w: table shop.orders takes the contract's rows once the sink adds the optional column(s) amount, device.os"
        );
        assert!(!fits.wants_recheck());
        let absent = TableCheck::Absent {
            sink: "w".into(),
            table: "shop.orders".into(),
        };
        assert_eq!(
            absent.to_string(),
            "sink w: table shop.orders does not exist yet; the sink creates it from the contract"
        );
        assert!(!absent.wants_recheck());
    }
}
