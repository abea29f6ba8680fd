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
    name: &'static str,
    description: &'static str,
}

impl LedgerStore {
    pub fn new(api: Api<ConfigMap>) -> Self {
        Self::named(api, LEDGER_NAME, LEDGER_DESCRIPTION)
    }

    /// A map in the ConfigMap `name`, with optimistic concurrency like the ledger.
    pub fn named(api: Api<ConfigMap>, name: &'static str, description: &'static str) -> Self {
        Self {
            api,
            name,
            description,
        }
    }

    pub async fn read(&self) -> Result<Ledger, Error> {
        Ok(Ledger {
            entries: self
                .api
                .get_opt(self.name)
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
            let current = self.api.get_opt(self.name).await?;
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
                        .replace(self.name, &PostParams::default(), &cm)
                        .await
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(self.name.to_owned()),
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
}
