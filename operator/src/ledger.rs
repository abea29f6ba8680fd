//! The topic ownership ledger: a ConfigMap in the operator's namespace whose
//! keys are `<cluster>.<topic>` and values `<namespace>/<pipeline>`. Updates
//! use the ConfigMap's resourceVersion, so two reconciles can never both
//! claim a topic. See `topics.rs` for why ownership is recorded here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::error::Error;
use crate::topics::{Owner, Ownership};

pub const LEDGER_NAME: &str = "keystone-topic-owners";

pub fn key(cluster: &str, topic: &str) -> String {
    format!("{cluster}.{topic}")
}

/// The ledger's entries, as last read.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub entries: BTreeMap<String, String>,
}

impl Ledger {
    pub fn ownership(&self, cluster: &str, topic: &str, me: &Owner) -> Ownership {
        match self
            .entries
            .get(&key(cluster, topic))
            .and_then(|v| Owner::parse(v))
        {
            Some(owner) if &owner == me => Ownership::Mine,
            Some(owner) => Ownership::Other(owner),
            None => Ownership::Unclaimed,
        }
    }

    /// The topics (cluster, topic) the ledger gives to `owner`.
    pub fn owned_by(&self, owner: &Owner) -> Vec<(String, String)> {
        let me = owner.to_string();
        self.entries
            .iter()
            .filter(|(_, v)| **v == me)
            .filter_map(|(k, _)| k.split_once('.').map(|(c, t)| (c.to_owned(), t.to_owned())))
            .collect()
    }
}

const LEDGER_DESCRIPTION: &str = "Which Pipeline created (owns) each Kafka topic: <cluster>.<topic> = <namespace>/<pipeline>. Written by the operator.";

/// Reads and updates the ledger ConfigMap (or another map kept the same way).
#[derive(Clone)]
pub struct LedgerStore {
    api: Api<ConfigMap>,
    name: String,
    description: &'static str,
}

impl LedgerStore {
    pub fn new(api: Api<ConfigMap>) -> Self {
        Self::named(api, LEDGER_NAME, LEDGER_DESCRIPTION)
    }

    /// A map in the ConfigMap `name`, with optimistic concurrency like the ledger.
    pub fn named(api: Api<ConfigMap>, name: impl Into<String>, description: &'static str) -> Self {
        Self {
            api,
            name: name.into(),
            description,
        }
    }

    pub async fn read(&self) -> Result<Ledger, Error> {
        Ok(Ledger {
            entries: self
                .api
                .get_opt(&self.name)
                .await?
                .and_then(|cm| cm.data)
                .unwrap_or_default(),
        })
    }

    /// Applies `change` to the entries and writes them, retrying on a
    /// concurrent update. `change` returns false when there is nothing to write.
    pub async fn update(
        &self,
        mut change: impl FnMut(&mut BTreeMap<String, String>) -> bool,
    ) -> Result<Ledger, Error> {
        for _ in 0..8 {
            let current = self.api.get_opt(&self.name).await?;
            let mut entries = current
                .as_ref()
                .and_then(|cm| cm.data.clone())
                .unwrap_or_default();
            if !change(&mut entries) {
                return Ok(Ledger { entries });
            }
            let result = match current {
                Some(mut cm) => {
                    cm.data = Some(entries.clone());
                    self.api
                        .replace(&self.name, &PostParams::default(), &cm)
                        .await
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/managed-by".to_owned(),
                                "keystone-operator".to_owned(),
                            )])),
                            annotations: Some(BTreeMap::from([(
                                "keystone.dev/description".to_owned(),
                                self.description.to_owned(),
                            )])),
                            ..ObjectMeta::default()
                        },
                        data: Some(entries.clone()),
                        ..ConfigMap::default()
                    };
                    self.api.create(&PostParams::default(), &cm).await
                }
            };
            match result {
                Ok(_) => return Ok(Ledger { entries }),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::LedgerContention)
    }

    /// Claims the given keys for `owner` where unclaimed; returns the ledger after.
    pub async fn claim(&self, keys: &[String], owner: &Owner) -> Result<Ledger, Error> {
        let me = owner.to_string();
        self.update(|entries| {
            let mut changed = false;
            for k in keys {
                if !entries.contains_key(k) {
                    entries.insert(k.clone(), me.clone());
                    changed = true;
                }
            }
            changed
        })
        .await
    }

    /// Releases the given keys if `owner` holds them.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Ledger, Error> {
        let me = owner.to_string();
        self.update(|entries| {
            let before = entries.len();
            entries.retain(|k, v| !(keys.contains(k) && *v == me));
            entries.len() != before
        })
        .await
    }
}

/// A map with an entry per Pipeline ever deployed, which one ConfigMap (1 MiB,
/// rewritten whole on each update) cannot hold at scale: its keys are spread
/// over [`SHARDS`] ConfigMaps `<name>-<nn>` by a stable hash, so an update
/// rewrites a thirty-second of it and concurrent updates of different keys
/// rarely conflict. The single ConfigMap `<name>` of earlier operators is
/// still read for keys not found in their shard; it is no longer written.
#[derive(Clone)]
pub struct ShardedMap {
    shards: Vec<LedgerStore>,
    legacy: LedgerStore,
    /// The legacy map's entries, read once: this operator never writes it, and
    /// at scale it is the large map the shards replace.
    legacy_entries: std::sync::Arc<tokio::sync::OnceCell<BTreeMap<String, String>>>,
}

/// How many ConfigMaps a [`ShardedMap`] spreads over (the chart's RBAC names each).
pub const SHARDS: u32 = 32;

/// Which of a [`ShardedMap`]'s shards holds `key`: stable across builds.
fn shard_index(key: &str) -> u32 {
    crc32fast::hash(key.as_bytes()) % SHARDS
}

fn numbered(name: &str, shard: u32) -> String {
    format!("{name}-{shard:02}")
}

/// The ConfigMap of `key` among a sharded map's ([`ShardedMap`]).
pub fn shard_name(name: &str, key: &str) -> String {
    numbered(name, shard_index(key))
}

impl ShardedMap {
    pub fn new(api: Api<ConfigMap>, name: &'static str, description: &'static str) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|i| LedgerStore::named(api.clone(), numbered(name, i), description))
                .collect(),
            legacy: LedgerStore::named(api, name, description),
            legacy_entries: Default::default(),
        }
    }

    /// The value of `key`: from its shard, else from the legacy map.
    pub async fn get(&self, key: &str) -> Result<Option<String>, Error> {
        let shard = &self.shards[shard_index(key) as usize];
        if let Some(value) = shard.read().await?.entries.remove(key) {
            return Ok(Some(value));
        }
        let legacy = self
            .legacy_entries
            .get_or_try_init(|| async { Ok::<_, Error>(self.legacy.read().await?.entries) })
            .await?;
        Ok(legacy.get(key).cloned())
    }

    /// Sets `key` to `value` in its shard (nothing is written when it holds it already).
    pub async fn set(&self, key: &str, value: &str) -> Result<(), Error> {
        self.shards[shard_index(key) as usize]
            .update(|entries| {
                entries.insert(key.to_owned(), value.to_owned()).as_deref() != Some(value)
            })
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_read_by_cluster_and_topic() {
        let me = Owner::parse("ns/a").expect("owner");
        let mut ledger = Ledger::default();
        ledger.entries.insert(key("main", "t.one"), "ns/a".into());
        ledger.entries.insert(key("main", "t.two"), "ns/b".into());
        assert_eq!(ledger.ownership("main", "t.one", &me), Ownership::Mine);
        assert_eq!(
            ledger.ownership("main", "t.two", &me),
            Ownership::Other(Owner::parse("ns/b").expect("owner"))
        );
        assert_eq!(
            ledger.ownership("other", "t.one", &me),
            Ownership::Unclaimed
        );
        assert_eq!(
            ledger.owned_by(&me),
            vec![("main".to_owned(), "t.one".to_owned())]
        );
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Stable across builds and operator versions: the record of a
        // Pipeline is found where an earlier operator wrote it.
        // CRC-32's check value: crc32("123456789") = 0xCBF43926, 38 mod 32 = 6.
        assert_eq!(shard_name("m", "123456789"), "m-06");
        let used: std::collections::BTreeSet<String> = (0..1000)
            .map(|i| shard_name("m", &format!("bench-s8.p{i}")))
            .collect();
        assert_eq!(used.len(), SHARDS as usize, "1,000 keys use every shard");
        assert!(
            used.iter()
                .all(|n| n.len() == "m-00".len() && n.starts_with("m-"))
        );
    }

    #[test]
    fn the_operators_roles_name_every_shard() {
        let kustomize = include_str!("../../config/rbac/self_role.yaml");
        for i in 0..SHARDS {
            let name = format!("- keystone-state-owners-{i:02}");
            assert!(
                kustomize.contains(&name),
                "config/rbac/self_role.yaml lacks {name}"
            );
        }
        let chart = include_str!("../../helm/keystone/templates/rbac.yaml");
        assert!(
            chart.contains(&format!("until {SHARDS} ")),
            "the chart's Role names {SHARDS} shards"
        );
    }
}
