//! The testbed's PostgreSQL (`e2e/testbed up`, component `postgres`), for the
//! change-data (CDC) sources' tests: PostgreSQL 15 with `wal_level=logical`
//! on 127.0.0.1, password (scram-sha-256) authentication over TCP, the
//! superuser `postgres` and the role `keystone` (LOGIN REPLICATION), which
//! owns the database `keystone`.
//!
//! ```no_run
//! # async fn t() {
//! use keystone_e2e::postgres::Postgres;
//! // None (the test skips) without the testbed's env, a panic with
//! // KEYSTONE_TEST_REQUIRE_POSTGRES=1 (scripts/test sets it).
//! let Some(pg) = Postgres::require() else { return };
//! let admin = pg.admin().await;
//! admin.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
//! // ... a source connects as pg.user / pg.password to pg.host:pg.port.
//! # }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::testbed::{run_script, state_dir};

/// Time allowed to connect (TCP and authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The testbed's PostgreSQL, from `e2e/testbed env`'s variables.
#[derive(Clone, Debug)]
pub struct Postgres {
    /// `127.0.0.1`.
    pub host: String,
    pub port: u16,
    /// The role sources use: `keystone` (LOGIN REPLICATION, owns `database`).
    pub user: String,
    pub password: String,
    /// `keystone`.
    pub database: String,
    /// `postgres://postgres:postgres@127.0.0.1:PORT/keystone`: the superuser.
    pub admin_url: String,
    /// The folder of `psql`, `pg_recvlogical`, ... of the server's version.
    pub bin_dir: PathBuf,
}

impl Postgres {
    /// From the environment (`eval "$(e2e/testbed env)"`): `None` when
    /// `KEYSTONE_TESTBED_POSTGRES_PORT` is not set (no testbed, or one
    /// without PostgreSQL); panics naming a variable the testbed exports
    /// beside it when that one is missing.
    pub fn from_env() -> Option<Postgres> {
        let port = match std::env::var("KEYSTONE_TESTBED_POSTGRES_PORT") {
            Ok(port) if !port.is_empty() => port,
            _ => return None,
        };
        let port = port.parse().unwrap_or_else(|_| {
            panic!("KEYSTONE_TESTBED_POSTGRES_PORT={port:?} is not a port number")
        });
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set, but KEYSTONE_TESTBED_POSTGRES_PORT is: export the testbed's env (eval \"$(e2e/testbed env)\")")
            })
        };
        Some(Postgres {
            host: var("KEYSTONE_TESTBED_POSTGRES_HOST"),
            port,
            user: var("KEYSTONE_TESTBED_POSTGRES_USER"),
            password: var("KEYSTONE_TESTBED_POSTGRES_PASSWORD"),
            database: var("KEYSTONE_TESTBED_POSTGRES_DATABASE"),
            admin_url: var("KEYSTONE_TESTBED_POSTGRES_ADMIN_URL"),
            bin_dir: std::env::var_os("KEYSTONE_TESTBED_POSTGRES_BIN").map_or_else(
                || PathBuf::from("/usr/lib/postgresql/15/bin"),
                PathBuf::from,
            ),
        })
    }

    /// [`Postgres::from_env`], or `None` to skip; a panic when
    /// `KEYSTONE_TEST_REQUIRE_POSTGRES=1` (scripts/test) and the testbed's
    /// PostgreSQL is missing.
    pub fn require() -> Option<Postgres> {
        let required = std::env::var("KEYSTONE_TEST_REQUIRE_POSTGRES").as_deref() == Ok("1");
        let Some(pg) = Postgres::from_env() else {
            assert!(
                !required,
                "KEYSTONE_TEST_REQUIRE_POSTGRES=1 but KEYSTONE_TESTBED_POSTGRES_PORT is not set: start the testbed with its postgres component (e2e/testbed up), and export its env (e2e/testbed env)"
            );
            eprintln!(
                "skipped: KEYSTONE_TESTBED_POSTGRES_PORT is not set (no PostgreSQL in the testbed)"
            );
            return None;
        };
        Some(pg)
    }

    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` of the `keystone` role.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            self.user, self.password, self.host, self.port, self.database
        )
    }

    /// A connection configuration for the `keystone` role over TCP.
    pub fn config(&self) -> Config {
        let mut config = Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.database)
            .connect_timeout(CONNECT_TIMEOUT);
        config
    }

    /// The superuser's configuration (`admin_url`).
    pub fn admin_config(&self) -> Config {
        let mut config: Config = self
            .admin_url
            .parse()
            .unwrap_or_else(|e| panic!("KEYSTONE_TESTBED_POSTGRES_ADMIN_URL: {e}"));
        config.connect_timeout(CONNECT_TIMEOUT);
        config
    }

    /// A client of the superuser `postgres` (over TCP, without TLS);
    /// panics when it cannot connect.
    pub async fn admin(&self) -> Client {
        connect(&self.admin_config()).await.unwrap_or_else(|e| {
            panic!(
                "connecting to the testbed's PostgreSQL as postgres at {}:{}: {e}",
                self.host, self.port
            )
        })
    }

    /// A client of the `keystone` role (over TCP, without TLS); panics when
    /// it cannot connect.
    pub async fn connect(&self) -> Client {
        connect(&self.config()).await.unwrap_or_else(|e| {
            panic!(
                "connecting to the testbed's PostgreSQL as {} at {}:{}: {e}",
                self.user, self.host, self.port
            )
        })
    }

    /// `e2e/testbed stop postgres`: a fast shutdown (sessions and
    /// replication connections are ended), the data stays.
    pub async fn stop(&self) -> anyhow::Result<()> {
        run_script(&state_dir(), &["stop", "postgres"]).await
    }

    /// `e2e/testbed start postgres`: starts it again on the same port and
    /// returns once it accepts connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        run_script(&state_dir(), &["start", "postgres"]).await
    }
}

/// Connects with `config` (no TLS) and spawns the connection's task, which
/// ends when the client is dropped or the server goes away.
pub async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("testbed PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}
