//! The PostgreSQL sample (`config/samples/orders-from-postgres.yaml`) set up
//! for one test: a role of its own (REPLICATION, owner of the table, CREATE
//! on the database) whose password appears nowhere else, its Secret, and the
//! sample pointed at the testbed's database, a unique table, slot and topic.

use keystone_e2e::TestNamespace;
use keystone_e2e::postgres::Postgres;

use super::{create_secret, repo, unique};

pub struct CaptureSample {
    /// `public.orders_<suffix>`.
    pub table: String,
    /// The slot's and the publication's name.
    pub slot: String,
    pub role: String,
    pub password: String,
    /// The capture topic.
    pub source: String,
    /// The sink topic.
    pub states: String,
    /// The sample for this test (`topicDeletionPolicy: Delete`, commits every 200 ms).
    pub manifest: String,
}

impl CaptureSample {
    /// Creates the role, the table with `columns` (`id bigint PRIMARY KEY,
    /// ...`) and `rows` rows made by `row_sql` (a `SELECT` over
    /// `generate_series(1, rows) g`), and the Secret `shop-db`.
    pub async fn create(
        pg: &Postgres,
        ns: &TestNamespace,
        columns: &str,
        row_sql: &str,
        rows: i64,
        snapshot: &str,
    ) -> CaptureSample {
        let suffix = unique("t").replace('-', "_");
        let table = format!("public.orders_{suffix}");
        let slot = format!("orders_{suffix}");
        let role = format!("capture_{suffix}");
        let password = format!("pw-{}", unique("secret"));
        pg.admin()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}';
                 GRANT CREATE ON DATABASE {database} TO {role};
                 CREATE TABLE {table} ({columns});
                 INSERT INTO {table} {row_sql} FROM generate_series(1, {rows}) g;
                 ALTER TABLE {table} OWNER TO {role};",
                database = pg.database
            ))
            .await
            .expect("the role and table");
        create_secret(
            ns,
            "shop-db",
            &[("username", role.as_str()), ("password", password.as_str())],
        )
        .await;
        let source = unique("e2e.shop.orders.cdc");
        let states = format!("{source}.states");
        let sample =
            std::fs::read_to_string(repo().join("config/samples/orders-from-postgres.yaml"))
                .expect("the sample");
        let manifest = sample
            .replace("namespace: default", &format!("namespace: {}", ns.name()))
            .replace("topic: shop.orders.cdc", &format!("topic: {source}"))
            .replace("topic: shop.orders.states", &format!("topic: {states}"))
            .replace(
                "host: postgres.shop.svc",
                &format!("host: {}\n      port: {}", pg.host, pg.port),
            )
            .replace("database: shop", &format!("database: {}", pg.database))
            .replace(
                "tables: [public.orders]",
                &format!(
                    "tables: [{table}]\n      slot: {slot}\n      publication: {slot}{snapshot}"
                ),
            )
            .replace(
                "commitInterval: 500ms",
                "commitInterval: 200ms\n  topicDeletionPolicy: Delete",
            );
        assert!(
            manifest.contains(&table) && manifest.contains(&source),
            "{manifest}"
        );
        CaptureSample {
            table,
            slot,
            role,
            password,
            source,
            states,
            manifest,
        }
    }

    /// Drops the publication, the table and the role (the pipeline's
    /// deletion dropped the slot).
    pub async fn clean_up(&self, db: &tokio_postgres::Client, pg: &Postgres) {
        db.batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {slot}; DROP TABLE {table};
             REVOKE CREATE ON DATABASE {database} FROM {role}; DROP ROLE {role}",
            slot = self.slot,
            table = self.table,
            role = self.role,
            database = pg.database
        ))
        .await
        .expect("clean up");
    }
}

/// Waits until the slot is gone (the operator had the capture drop it).
pub async fn wait_slot_dropped(
    db: &tokio_postgres::Client,
    slot: &str,
    operator: &super::OperatorProcess,
) {
    let slots = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
    keystone_e2e::wait_until(
        std::time::Duration::from_secs(90),
        "the operator dropped the capture's slot",
        || async {
            let row = db.query_one(&slots, &[]).await.ok()?;
            (row.get::<_, i64>(0) == 0).then_some(())
        },
        || async { operator.log_text() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}
