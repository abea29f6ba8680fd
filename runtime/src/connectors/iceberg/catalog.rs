//! The catalog an Iceberg sink commits through: an Iceberg REST catalog,
//! with the table's files read and written through OpenDAL (`file://` and
//! `s3://` locations), credentials from the sink's `credentialsSecret`.

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::io::{
    S3_ACCESS_KEY_ID, S3_ENDPOINT, S3_PATH_STYLE_ACCESS, S3_REGION, S3_SECRET_ACCESS_KEY,
};
use iceberg::{Catalog, CatalogBuilder};
use iceberg_catalog_rest::{
    REST_CATALOG_PROP_URI, REST_CATALOG_PROP_WAREHOUSE, RestCatalogBuilder,
};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;
use keystone_crds::pipeline::{IcebergCatalogType, IcebergSinkSpec, SinkSecretKey, SinkSpec};

use crate::connectors::lake::LakeError;

/// The region requests to an S3-compatible `endpoint` are signed with when
/// the Secret names none.
const DEFAULT_REGION: &str = "us-east-1";

/// The REST catalog property of a bearer token (sent as `Authorization`).
const REST_TOKEN: &str = "token";

/// The properties of the REST catalog and of the FileIO of its tables, with
/// the credentials read through `env`. Nothing is contacted yet.
pub fn rest_properties(
    sink: &SinkSpec,
    iceberg: &IcebergSinkSpec,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<String, String>, LakeError> {
    let catalog = &iceberg.catalog;
    if catalog.catalog_type != IcebergCatalogType::Rest {
        return Err(LakeError::Path {
            path: catalog.uri.clone(),
            message:
                "catalog.type: only Iceberg REST catalogs (type: rest) are written by this version"
                    .to_owned(),
        });
    }
    if !(catalog.uri.starts_with("http://") || catalog.uri.starts_with("https://")) {
        return Err(LakeError::Path {
            path: catalog.uri.clone(),
            message: "catalog.uri must be an http:// or https:// URL of an Iceberg REST catalog"
                .to_owned(),
        });
    }
    let secret = |key| env(&sink.secret_env(key)).filter(|v| !v.is_empty());
    let mut props = HashMap::from([
        (REST_CATALOG_PROP_URI.to_owned(), catalog.uri.clone()),
        (
            REST_CATALOG_PROP_WAREHOUSE.to_owned(),
            catalog.warehouse.clone(),
        ),
    ]);
    if let Some(token) = secret(SinkSecretKey::Token) {
        props.insert(REST_TOKEN.to_owned(), token);
    }
    // The object store's settings reach the FileIO of every table the catalog
    // loads; the catalog's own (vended) settings do not override them.
    let endpoint = secret(SinkSecretKey::Endpoint);
    let region = secret(SinkSecretKey::Region);
    if let Some(region) = region.clone() {
        props.insert(S3_REGION.to_owned(), region);
    }
    if let Some(endpoint) = endpoint {
        props.insert(S3_ENDPOINT.to_owned(), endpoint);
        // S3-compatible stores (MinIO, gofakes3) serve buckets by path.
        props.insert(S3_PATH_STYLE_ACCESS.to_owned(), "true".to_owned());
        // They ignore the region, but requests are signed with one; as the
        // Parquet sink does, us-east-1 unless the Secret names another.
        if region.is_none() {
            props.insert(S3_REGION.to_owned(), DEFAULT_REGION.to_owned());
        }
    }
    match (
        secret(SinkSecretKey::AccessKeyId),
        secret(SinkSecretKey::SecretAccessKey),
    ) {
        (Some(id), Some(key)) => {
            props.insert(S3_ACCESS_KEY_ID.to_owned(), id);
            props.insert(S3_SECRET_ACCESS_KEY.to_owned(), key);
        }
        (None, None) => {}
        _ => {
            return Err(LakeError::Path {
                path: catalog.warehouse.clone(),
                message: format!(
                    "{} and {} must be set together",
                    sink.secret_env(SinkSecretKey::AccessKeyId),
                    sink.secret_env(SinkSecretKey::SecretAccessKey)
                ),
            });
        }
    }
    Ok(props)
}

/// The REST catalog of `props`, spawning its work on `runtime`. The catalog
/// is first contacted by the first call made through it.
pub fn open_rest(
    props: HashMap<String, String>,
    runtime: &tokio::runtime::Runtime,
) -> Result<Arc<dyn Catalog>, LakeError> {
    let uri = props
        .get(REST_CATALOG_PROP_URI)
        .cloned()
        .unwrap_or_default();
    let builder = RestCatalogBuilder::default()
        .with_storage_factory(Arc::new(OpenDalResolvingStorageFactory::new()))
        .with_runtime(iceberg::Runtime::new(runtime));
    // `load` only checks the properties; the configuration is fetched lazily.
    let catalog = runtime
        .block_on(builder.load("keystone", props))
        .map_err(|source| LakeError::Iceberg {
            what: format!("the REST catalog at {uri}"),
            source: Box::new(source),
        })?;
    Ok(Arc::new(catalog))
}

#[cfg(test)]
mod tests {
    use keystone_crds::duration::Duration;
    use keystone_crds::pipeline::IcebergCatalogSpec;

    use super::*;

    fn spec(uri: &str) -> (SinkSpec, IcebergSinkSpec) {
        let iceberg = IcebergSinkSpec {
            catalog: IcebergCatalogSpec {
                catalog_type: IcebergCatalogType::Rest,
                uri: uri.to_owned(),
                warehouse: "s3://lake/warehouse".to_owned(),
                credentials_secret: Some("lake-credentials".to_owned()),
            },
            namespace: "shop".to_owned(),
            table: "orders".to_owned(),
            partition_by: vec![],
            commit_interval: Duration::from_secs(60),
        };
        let sink = SinkSpec {
            name: "orders-lake".to_owned(),
            kafka: None,
            elasticsearch: None,
            iceberg: Some(iceberg.clone()),
            parquet: None,
        };
        (sink, iceberg)
    }

    #[test]
    fn credentials_become_catalog_and_store_properties() {
        let (sink, iceberg) = spec("http://catalog:8181");
        let env = |name: &str| match name {
            "KEYSTONE_SINK_ORDERS_LAKE_TOKEN" => Some("t0k".to_owned()),
            "KEYSTONE_SINK_ORDERS_LAKE_ENDPOINT" => Some("http://s3:9000".to_owned()),
            "KEYSTONE_SINK_ORDERS_LAKE_ACCESS_KEY_ID" => Some("id".to_owned()),
            "KEYSTONE_SINK_ORDERS_LAKE_SECRET_ACCESS_KEY" => Some("key".to_owned()),
            _ => None,
        };
        let props = rest_properties(&sink, &iceberg, &env).unwrap();
        assert_eq!(props[REST_CATALOG_PROP_URI], "http://catalog:8181");
        assert_eq!(props[REST_CATALOG_PROP_WAREHOUSE], "s3://lake/warehouse");
        assert_eq!(props[REST_TOKEN], "t0k");
        assert_eq!(props[S3_ENDPOINT], "http://s3:9000");
        assert_eq!(props[S3_PATH_STYLE_ACCESS], "true");
        assert_eq!(props[S3_ACCESS_KEY_ID], "id");
        // Signed with a region even when the Secret names none (opendal
        // refuses to build the store without one).
        assert_eq!(props[S3_REGION], "us-east-1");
    }

    #[test]
    fn the_secrets_region_wins_and_aws_s3_gets_none_by_default() {
        let (sink, iceberg) = spec("http://catalog:8181");
        let env = |name: &str| match name {
            "KEYSTONE_SINK_ORDERS_LAKE_ENDPOINT" => Some("http://s3:9000".to_owned()),
            "KEYSTONE_SINK_ORDERS_LAKE_REGION" => Some("eu-west-1".to_owned()),
            _ => None,
        };
        let props = rest_properties(&sink, &iceberg, &env).unwrap();
        assert_eq!(props[S3_REGION], "eu-west-1");
        // Without an endpoint (AWS S3), the catalog or the environment names it.
        let props = rest_properties(&sink, &iceberg, &|_| None).unwrap();
        assert!(!props.contains_key(S3_REGION), "{props:?}");
    }

    #[test]
    fn the_operator_passes_every_key_the_sink_reads() {
        let (sink, _) = spec("http://catalog:8181");
        let passed: Vec<(String, &str, bool)> = sink
            .secret_refs()
            .iter()
            .map(|r| (sink.secret_env(r.key), r.secret, r.optional))
            .collect();
        let read = [
            "KEYSTONE_SINK_ORDERS_LAKE_TOKEN",
            "KEYSTONE_SINK_ORDERS_LAKE_ENDPOINT",
            "KEYSTONE_SINK_ORDERS_LAKE_REGION",
            "KEYSTONE_SINK_ORDERS_LAKE_ACCESS_KEY_ID",
            "KEYSTONE_SINK_ORDERS_LAKE_SECRET_ACCESS_KEY",
        ];
        assert_eq!(
            passed,
            read.map(|env| (env.to_owned(), "lake-credentials", true))
        );
    }

    #[test]
    fn half_a_key_pair_and_other_catalogs_are_refused() {
        let (sink, iceberg) = spec("http://catalog:8181");
        let env = |name: &str| {
            (name == "KEYSTONE_SINK_ORDERS_LAKE_ACCESS_KEY_ID").then(|| "id".to_owned())
        };
        let error = rest_properties(&sink, &iceberg, &env)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("KEYSTONE_SINK_ORDERS_LAKE_SECRET_ACCESS_KEY"),
            "{error}"
        );
        let (sink, iceberg) = spec("thrift://metastore:9083");
        let error = rest_properties(&sink, &iceberg, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("catalog.uri must be an http"), "{error}");
        let (sink, mut iceberg) = spec("http://catalog:8181");
        iceberg.catalog.catalog_type = IcebergCatalogType::Sql;
        let error = rest_properties(&sink, &iceberg, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("type: rest"), "{error}");
    }
}
