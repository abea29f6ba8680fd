//! The testbed's PostgreSQL (component `postgres`), as the CDC sources need
//! it: `wal_level=logical`, a publication and a `pgoutput` slot that decodes
//! an insert, the `keystone` role logging in over TCP with its password
//! (scram-sha-256; a wrong one is refused) and opening a replication
//! connection.
//!
//! Runs when `KEYSTONE_TESTBED_POSTGRES_PORT` is set (`e2e/testbed env`
//! exports it); with `KEYSTONE_TEST_REQUIRE_POSTGRES=1` a missing PostgreSQL
//! fails the test instead of skipping it.

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::FutureExt as _;
use keystone_e2e::postgres::{self, Postgres};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// A name no other run uses: `smoke_<pid>_<nanoseconds>`.
fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("smoke_{}_{nanos:x}", std::process::id())
}

/// The slots the test makes: the admin's and the keystone role's.
fn slots(name: &str) -> [String; 2] {
    [name.to_owned(), format!("{name}_k")]
}

#[tokio::test]
async fn logical_slot_and_password_logins() {
    let Some(pg) = Postgres::require() else {
        return;
    };
    let admin = pg.admin().await;
    let name = unique_name();
    // Whatever fails, no slot (which would hold WAL back), publication or
    // table is left behind.
    let outcome = AssertUnwindSafe(checks(&pg, &admin, &name))
        .catch_unwind()
        .await;
    let slots = slots(&name);
    let cleanup = admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
               WHERE slot_name IN ('{}', '{}');
             DROP PUBLICATION IF EXISTS {name};
             DROP TABLE IF EXISTS {name};",
            slots[0], slots[1]
        ))
        .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    cleanup.expect("drop the slots, publication and table");
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1)) \
             + (SELECT count(*) FROM pg_publication WHERE pubname = $2) \
             + (SELECT count(*) FROM pg_class WHERE relname = $2)",
            &[&slots.to_vec(), &name],
        )
        .await
        .expect("count leftovers")
        .get(0);
    assert_eq!(left, 0);
}

async fn checks(pg: &Postgres, admin: &Client, name: &str) {
    let wal_level: String = admin
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW wal_level")
        .get(0);
    assert_eq!(wal_level, "logical");
    let superuser: String = admin
        .query_one("SHOW is_superuser", &[])
        .await
        .expect("SHOW is_superuser")
        .get(0);
    assert_eq!(superuser, "on", "admin_url must name a superuser");

    // TCP connections, normal and replication ones, need a password.
    let rules = admin
        .query(
            "SELECT array_to_string(database, ','), auth_method FROM pg_hba_file_rules \
             WHERE type = 'host' AND address = '127.0.0.1' ORDER BY line_number",
            &[],
        )
        .await
        .expect("pg_hba_file_rules");
    let rules: Vec<(String, String)> = rules.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        rules.contains(&("replication".to_owned(), "scram-sha-256".to_owned())),
        "{rules:?}"
    );
    assert!(
        rules.iter().all(|(_, method)| method == "scram-sha-256"),
        "{rules:?}"
    );

    // A publication and a pgoutput slot, which decodes an insert into the
    // published table.
    admin
        .batch_execute(&format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, v text);
             CREATE PUBLICATION {name} FOR TABLE {name};"
        ))
        .await
        .expect("create table and publication");
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .expect("create the pgoutput slot");
    let plugin: String = admin
        .query_one(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'logical'",
            &[&name],
        )
        .await
        .expect("the slot")
        .get(0);
    assert_eq!(plugin, "pgoutput");
    admin
        .batch_execute(&format!("INSERT INTO {name} VALUES (1, 'one');"))
        .await
        .expect("insert");
    // Begin, Relation, Insert, Commit: pgoutput's first bytes name them.
    let kinds: Vec<String> = admin
        .query(
            "SELECT chr(get_byte(data, 0)) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            &[&name, &name],
        )
        .await
        .expect("peek the slot's changes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["B", "R", "I", "C"]);
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .expect("drop the slot");
    admin
        .batch_execute(&format!("DROP PUBLICATION {name}; DROP TABLE {name};"))
        .await
        .expect("drop publication and table");

    // The keystone role over TCP with its password (scram-sha-256): it owns
    // the database and may replicate.
    let client = pg.connect().await;
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, rolreplication, \
             (SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = current_database()) \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("who am I");
    assert_eq!(row.get::<_, String>(0), pg.user);
    assert_eq!(row.get::<_, String>(1), pg.database);
    assert!(row.get::<_, bool>(2), "{} lacks REPLICATION", pg.user);
    assert_eq!(row.get::<_, String>(3), pg.user);
    let slot = &slots(name)[1];
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .expect("a slot as the keystone role");
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[slot])
        .await
        .expect("drop it");

    let mut wrong = pg.config();
    wrong.password("not-the-password");
    let Err(error) = postgres::connect(&wrong).await else {
        panic!("a wrong password must be refused");
    };
    assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD), "{error:?}");

    // A replication connection over TCP (tokio-postgres has no replication
    // protocol: psql's walsender mode runs IDENTIFY_SYSTEM).
    let output = Command::new(pg.bin_dir.join("psql"))
        .args(["-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM"])
        .arg(format!(
            "host={} port={} user={} dbname={} replication=database",
            pg.host, pg.port, pg.user, pg.database
        ))
        .env("PGPASSWORD", &pg.password)
        .env_remove("PGSERVICE")
        .output()
        .expect("run psql");
    assert!(
        output.status.success(),
        "IDENTIFY_SYSTEM over a replication connection: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(
        answer.trim().ends_with(&format!("|{}", pg.database)),
        "IDENTIFY_SYSTEM answered {answer:?}"
    );
}
