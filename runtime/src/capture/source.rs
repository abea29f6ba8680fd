//! The database side of a capture, over an ordinary SQL connection: the
//! captured tables' columns and primary keys, the publication and the slot,
//! watermarks, snapshot chunks, and how much WAL the slot retains.

use std::sync::Arc;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::capture::changes::{Cell, Change, Column, Relation, Row, TableName};
use crate::capture::config::Connection;
use crate::capture::snapshot::{Visibility, WATERMARK_PREFIX, Watermark};
use crate::capture::values::{DecimalHandling, field_type, to_json};
use keystone_crds::pipeline::capture::{SourceColumn, SourceTable};

/// Session settings of both connections (SQL and replication), so that values
/// render the same whichever of them reads a row.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3 -c standard_conforming_strings=on";

/// A captured table as the catalog describes it.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub name: Arc<TableName>,
    pub columns: Vec<Column>,
    /// Each column's type as SQL (`numeric(10,2)`), to cast key literals.
    pub column_types: Vec<String>,
    /// Each column's NOT NULL constraint.
    pub not_null: Vec<bool>,
    pub primary_key: Vec<String>,
    /// `REPLICA IDENTITY FULL`: updates and deletes carry the whole old row.
    pub replica_full: bool,
}

impl TableInfo {
    pub fn relation(&self) -> Result<Relation, String> {
        Relation::new(self.name.clone(), self.columns.clone(), &self.primary_key)
    }

    /// The table as the operator checks the pipeline against it.
    pub fn report(&self, decimals: DecimalHandling) -> SourceTable {
        SourceTable {
            name: self.name.to_string(),
            columns: self
                .columns
                .iter()
                .zip(&self.column_types)
                .zip(&self.not_null)
                .map(|((column, sql_type), not_null)| SourceColumn {
                    name: column.name.to_string(),
                    sql_type: sql_type.clone(),
                    field_type: field_type(column.type_oid, decimals),
                    nullable: !not_null,
                    primary_key: self.primary_key.iter().any(|k| **k == *column.name),
                })
                .collect(),
        }
    }
}

pub async fn connect(
    connection: &Connection,
    user: &str,
    password: &str,
) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&connection.host)
        .port(connection.port)
        .dbname(&connection.database)
        .user(user)
        .password(password)
        .options(SESSION_OPTIONS)
        .application_name("keystone-capture")
        .connect_timeout(std::time::Duration::from_secs(10));
    let (client, driver) = config.connect(NoTls).await.map_err(|e| {
        format!(
            "connecting to postgres://{}@{}:{}/{}: {}",
            user,
            connection.host,
            connection.port,
            connection.database,
            error_text(&e)
        )
    })?;
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::warn!(error = %error_text(&error), "the SQL connection to the database ended");
        }
    });
    Ok(client)
}

/// A database error with the server's message, not only "db error".
pub fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => error.to_string(),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    // standard_conforming_strings is on (SESSION_OPTIONS): only quotes escape.
    format!("'{}'", text.replace('\'', "''"))
}

pub fn qualified(table: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    )
}

/// Reads a table's columns, primary key and replica identity; refuses a table
/// that does not exist, has no primary key or publishes no old rows.
pub async fn describe(client: &Client, table: &TableName) -> Result<TableInfo, String> {
    let rows = client
        .query(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| format!("{table}: {}", error_text(&e)))?;
    let Some(row) = rows.first() else {
        return Err(format!(
            "table {table} does not exist (or this user cannot see it)"
        ));
    };
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    if identity == "n" {
        return Err(format!(
            "{table} has REPLICA IDENTITY NOTHING: its updates and deletes are not in the log; \
             set REPLICA IDENTITY DEFAULT or FULL"
        ));
    }
    let columns = client
        .query(
            "SELECT attname::text, atttypid, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| format!("{table}: {}", error_text(&e)))?;
    let key = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.position",
            &[&oid],
        )
        .await
        .map_err(|e| format!("{table}: {}", error_text(&e)))?;
    if key.is_empty() {
        return Err(format!(
            "{table} has no primary key: its changes could not be keyed or ordered per row; add one"
        ));
    }
    Ok(TableInfo {
        name: Arc::new(table.clone()),
        columns: columns
            .iter()
            .map(|r| Column {
                name: r.get::<_, String>(0).into(),
                type_oid: r.get(1),
            })
            .collect(),
        column_types: columns.iter().map(|r| r.get(2)).collect(),
        not_null: columns.iter().map(|r| r.get(3)).collect(),
        primary_key: key.iter().map(|r| r.get(0)).collect(),
        replica_full: identity == "f",
    })
}

/// Makes sure the publication exists and publishes every table; creates it
/// when asked.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableInfo],
    create: bool,
) -> Result<(), String> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| format!("publication {publication}: {}", error_text(&e)))?
        .is_some();
    if !exists {
        if !create {
            return Err(format!(
                "publication {publication} does not exist; create it (CREATE PUBLICATION {publication} FOR TABLE ...) or let the capture create it"
            ));
        }
        let list: Vec<String> = tables.iter().map(|t| qualified(&t.name)).collect();
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(publication),
                list.join(", ")
            ))
            .await
            .map_err(|e| format!("creating publication {publication}: {}", error_text(&e)))?;
        tracing::info!(publication, "created the publication");
    }
    for table in tables {
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &table.name.schema, &table.name.name],
            )
            .await
            .map_err(|e| format!("publication {publication}: {}", error_text(&e)))?
            .is_some();
        if !published {
            return Err(format!(
                "publication {publication} does not publish {}; ALTER PUBLICATION {publication} ADD TABLE {}",
                table.name,
                qualified(&table.name)
            ));
        }
    }
    Ok(())
}

/// Makes sure the slot exists and decodes with `pgoutput`; creates it when asked.
pub async fn ensure_slot(client: &Client, slot: &str, create: bool) -> Result<(), String> {
    let plugin: Option<String> = client
        .query_opt(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("slot {slot}: {}", error_text(&e)))?
        .map(|r| r.get(0));
    match plugin.as_deref() {
        Some("pgoutput") => Ok(()),
        Some(other) => Err(format!(
            "slot {slot} decodes with {other}; the capture needs a pgoutput slot"
        )),
        None if create => {
            client
                .query(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .map_err(|e| format!("creating slot {slot}: {}", error_text(&e)))?;
            tracing::info!(slot, "created the replication slot");
            Ok(())
        }
        None => Err(format!(
            "replication slot {slot} does not exist; create it (pg_create_logical_replication_slot('{slot}', 'pgoutput')) or let the capture create it"
        )),
    }
}

/// Writes a watermark into the log (its own transaction).
pub async fn emit_watermark(client: &Client, watermark: &Watermark) -> Result<(), String> {
    client
        .query(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[&WATERMARK_PREFIX, &watermark.content()],
        )
        .await
        .map_err(|e| format!("writing a snapshot watermark: {}", error_text(&e)))?;
    Ok(())
}

/// A snapshot chunk as one repeatable-read transaction saw it.
pub struct SelectedChunk {
    pub rows: Vec<Change>,
    /// The primary key text of the last row.
    pub last_key: Option<Vec<String>>,
    pub visibility: Visibility,
}

/// Which rows a chunk reads: up to `limit` rows of `table` after the key
/// `after`, in key order.
pub struct ChunkQuery<'a> {
    pub table: &'a TableInfo,
    pub relation: &'a Relation,
    pub after: Option<&'a [String]>,
    pub limit: u32,
    pub decimals: DecimalHandling,
}

/// A chunk's rows, with the transactions the select could see.
pub async fn select_chunk(
    client: &Client,
    query: &ChunkQuery<'_>,
) -> Result<SelectedChunk, String> {
    let table = query.table;
    let failed = |e: tokio_postgres::Error| {
        format!(
            "reading a snapshot chunk of {}: {}",
            table.name,
            error_text(&e)
        )
    };
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(failed)?;
    let selected = async {
        // The first statement fixes the transaction's snapshot: this one.
        let snapshot: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(failed)?
            .get(0);
        let visibility = Visibility::parse(&snapshot)?;
        let (rows, last_key) = select_rows(client, query).await?;
        Ok::<_, String>(SelectedChunk {
            rows,
            last_key,
            visibility,
        })
    }
    .await;
    let end = if selected.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client.batch_execute(end).await.map_err(failed);
    let selected = selected?;
    ended?;
    Ok(selected)
}

async fn select_rows(
    client: &Client,
    query: &ChunkQuery<'_>,
) -> Result<(Vec<Change>, Option<Vec<String>>), String> {
    let ChunkQuery {
        table,
        relation,
        after,
        limit,
        decimals,
    } = *query;
    let key_columns: Vec<usize> = table
        .primary_key
        .iter()
        .filter_map(|k| table.columns.iter().position(|c| &*c.name == k))
        .collect();
    let keys: Vec<String> = key_columns
        .iter()
        .map(|&i| quote_ident(&table.columns[i].name))
        .collect();
    let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut sql = format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        qualified(&table.name)
    );
    if let Some(after) = after {
        let literals: Vec<String> = key_columns
            .iter()
            .zip(after)
            .map(|(&i, text)| format!("{}::{}", quote_literal(text), table.column_types[i]))
            .collect();
        sql.push_str(&format!(
            " WHERE ({}) > ({})",
            keys.join(", "),
            literals.join(", ")
        ));
    }
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", keys.join(", ")));
    let messages = client.simple_query(&sql).await.map_err(|e| {
        format!(
            "reading a snapshot chunk of {}: {}",
            table.name,
            error_text(&e)
        )
    })?;
    let mut changes = Vec::new();
    let mut last_key = None;
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let mut values: Row = Vec::with_capacity(table.columns.len());
        for (i, column) in table.columns.iter().enumerate() {
            let cell = match row.get(i) {
                None => Cell::Null,
                Some(text) => Cell::Value(to_json(column.type_oid, text, decimals)),
            };
            values.push((column.name.clone(), cell));
        }
        last_key = Some(
            key_columns
                .iter()
                .map(|&i| row.get(i).unwrap_or_default().to_owned())
                .collect(),
        );
        changes.push(Change::read(relation, values)?);
    }
    Ok((changes, last_key))
}

/// Bytes of WAL the slot holds back (the server's position less the slot's
/// confirmed one): what a stalled capture costs the database's disk.
pub async fn retained_wal_bytes(client: &Client, slot: &str) -> Result<Option<i64>, String> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("slot {slot}: {}", error_text(&e)))?;
    Ok(row.and_then(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_maps_each_column_to_its_contract_type() {
        use keystone_crds::schema::FieldType;
        let column = |name: &str, type_oid| Column {
            name: name.into(),
            type_oid,
        };
        let table = TableInfo {
            name: Arc::new(TableName::parse("shop.orders").unwrap()),
            columns: vec![
                column("id", 20),
                column("total", 1700),
                column("meta", 3802),
            ],
            column_types: vec!["bigint".into(), "numeric(12,2)".into(), "jsonb".into()],
            not_null: vec![true, false, false],
            primary_key: vec!["id".into()],
            replica_full: false,
        };
        let report = table.report(DecimalHandling::String);
        assert_eq!(report.name, "shop.orders");
        let rows: Vec<_> = report
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.sql_type.as_str(),
                    c.field_type,
                    c.nullable,
                    c.primary_key,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("id", "bigint", FieldType::Integer, false, true),
                ("total", "numeric(12,2)", FieldType::String, true, false),
                ("meta", "jsonb", FieldType::Any, true, false),
            ]
        );
        assert_eq!(
            table.report(DecimalHandling::Number).columns[1].field_type,
            FieldType::Number
        );
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        let table = TableName::parse("Shop.Orders").unwrap();
        assert_eq!(qualified(&table), r#""Shop"."Orders""#);
    }
}
