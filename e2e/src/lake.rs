//! The lake of the testbed (`e2e/testbed up`): its S3-compatible store and
//! the independent readers of `e2e/readers` (pyarrow, pyiceberg), which the
//! lake sinks' tests read the results with.

use std::process::Command;

use serde_json::Value;

/// The testbed's store and readers.
pub struct Lake {
    pub endpoint: String,
    pub bucket: String,
    /// The Iceberg REST catalog and its warehouse.
    pub catalog: String,
    pub warehouse: String,
    python: String,
    readers: String,
}

impl Lake {
    /// From the testbed's environment (`eval "$(e2e/testbed env)"`); panics
    /// naming the variable when the lake is not up.
    pub fn from_env() -> Lake {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: start the testbed with the lake (e2e/testbed up) and eval \"$(e2e/testbed env)\"")
            })
        };
        Lake {
            endpoint: var("KEYSTONE_TESTBED_S3_ENDPOINT"),
            bucket: var("KEYSTONE_TESTBED_S3_BUCKET"),
            catalog: var("KEYSTONE_TESTBED_ICEBERG_URI"),
            warehouse: var("KEYSTONE_TESTBED_ICEBERG_WAREHOUSE"),
            python: var("KEYSTONE_TESTBED_LAKE_PYTHON"),
            readers: std::env::var("KEYSTONE_TESTBED_READERS")
                .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/readers").to_owned()),
        }
    }

    /// The same lake with the testbed's other Iceberg REST catalog, whose
    /// warehouse is `s3://<bucket>/warehouse` on the store: its tables' files
    /// are read and written with the store's endpoint and keys.
    pub fn with_s3_warehouse(mut self) -> Lake {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: restart the testbed (e2e/testbed down; e2e/testbed up) and eval \"$(e2e/testbed env)\"")
            })
        };
        self.catalog = var("KEYSTONE_TESTBED_ICEBERG_S3_URI");
        self.warehouse = var("KEYSTONE_TESTBED_ICEBERG_S3_WAREHOUSE");
        self
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The credentials of a sink named `lake`, as the operator passes them
    /// from its Secret.
    pub fn sink_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KEYSTONE_SINK_LAKE_ENDPOINT", self.endpoint.clone()),
            ("KEYSTONE_SINK_LAKE_ACCESS_KEY_ID", "keystone".to_owned()),
            (
                "KEYSTONE_SINK_LAKE_SECRET_ACCESS_KEY",
                "keystone".to_owned(),
            ),
        ]
    }

    fn reader(&self, args: &[&str]) -> Vec<Value> {
        let mut all = args.to_vec();
        all.extend(["--endpoint", &self.endpoint]);
        self.run("read_parquet.py", &all)
            .unwrap_or_else(|error| panic!("read_parquet.py {args:?}: {error}"))
    }

    /// The rows of Iceberg table `namespace.table` (pyiceberg, through the
    /// REST catalog), or the reader's error (a table not created yet).
    pub fn iceberg_rows(&self, table: &str) -> Result<Vec<Value>, String> {
        self.run(
            "read_iceberg.py",
            &["--uri", &self.catalog, "--table", table],
        )
    }

    /// The snapshots of Iceberg table `namespace.table`, oldest first.
    pub fn iceberg_snapshots(&self, table: &str) -> Result<Vec<Value>, String> {
        self.run(
            "read_iceberg.py",
            &["--uri", &self.catalog, "--table", table, "--snapshots"],
        )
    }

    /// Creates Iceberg table `namespace.table` with `columns`
    /// (`name:type[:required]`) through pyiceberg, as a team's own tooling
    /// would: a table Keystone did not create.
    pub fn create_iceberg_table(&self, table: &str, columns: &[&str]) -> Result<(), String> {
        let mut args = vec!["--uri", &self.catalog, "--table", table, "--create"];
        args.extend(columns);
        self.run("iceberg_table.py", &args).map(drop)
    }

    /// Drops Iceberg table `namespace.table` and its data, if it exists.
    pub fn drop_iceberg_table(&self, table: &str) -> Result<(), String> {
        self.run(
            "iceberg_table.py",
            &["--uri", &self.catalog, "--table", table, "--drop"],
        )
        .map(drop)
    }

    fn run(&self, reader: &str, args: &[&str]) -> Result<Vec<Value>, String> {
        let output = Command::new(&self.python)
            .arg(format!("{}/{reader}", self.readers))
            .args(args)
            // The store of s3:// warehouses (the Parquet reader's flag too).
            .env("KEYSTONE_TESTBED_S3_ENDPOINT", &self.endpoint)
            .output()
            .map_err(|e| format!("running {reader}: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).map_err(|e| format!("{e}: {line}")))
            .collect()
    }

    /// The rows under `prefix` (none when nothing is published yet).
    pub fn rows(&self, prefix: &str) -> Vec<Value> {
        if self.keys(prefix).iter().all(|k| k.starts_with('_')) {
            return Vec::new();
        }
        self.reader(&["--path", &self.url(prefix), "--partition-strings"])
    }

    /// Every object key under `prefix`, relative to it.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.reader(&["--path", &self.url(prefix), "--list"])
            .into_iter()
            .map(|entry| entry["key"].as_str().unwrap().to_owned())
            .collect()
    }
}
