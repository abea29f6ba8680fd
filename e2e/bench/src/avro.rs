//! S12's Avro parts: the generated events' Avro schema, loading them as records in
//! the Confluent wire format (registered under `<topic>-value`), Keystone's plan with
//! its Avro parts filled from the registry, and the output watcher's decoder.
//!
//! The records are written with Keystone's own encoder (`keystone_avro::encode`):
//! this is test tooling, and Avro's binary encoding of a record is fixed by its
//! schema, so any conforming writer gives the same bytes. The watcher decodes every
//! engine's output with `keystone_avro::decode` (the writer schema fetched by id).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use keystone_avro::registry::{Registry as Client, RegistryConfig};
use keystone_avro::{AvroSchema, Shape};
use keystone_crds::pipeline::avro::SchemaRegistrySpec;

use crate::kafka::drive::{self, TopicSpec};

/// The Avro topic S12 reads (the generated events, 2 partitions, keyed by event_id).
pub const AVRO_TOPIC: &str = "bench.events.avro";

/// The generated events' schema (`generate::events`): every field required, as the
/// generator always writes each one.
pub const EVENT_SCHEMA: &str = r#"{"type": "record", "name": "Event", "namespace": "dev.keystone.bench", "fields": [
  {"name": "event_id", "type": "string"},
  {"name": "ts", "type": "long"},
  {"name": "user_id", "type": "string"},
  {"name": "session_id", "type": "string"},
  {"name": "customer_id", "type": "string"},
  {"name": "action", "type": "string"},
  {"name": "page", "type": "string"},
  {"name": "amount", "type": "double"},
  {"name": "currency", "type": "string"},
  {"name": "country", "type": "string"},
  {"name": "bot", "type": "boolean"},
  {"name": "device", "type": {"type": "record", "name": "Device", "fields": [
    {"name": "os", "type": "string"},
    {"name": "model", "type": "string"},
    {"name": "app", "type": "string"}]}},
  {"name": "note", "type": "string"}]}"#;

/// A client of the registry (Confluent-compatible API), with the runtime its calls
/// run on.
pub struct Registry {
    runtime: tokio::runtime::Runtime,
    client: Client,
    url: String,
}

impl Registry {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = Client::new(&RegistryConfig {
            url: url.to_owned(),
            auth: None,
            ca_pem: None,
        })?;
        Ok(Self {
            runtime,
            client,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn register(&self, subject: &str, schema: &str) -> anyhow::Result<u32> {
        self.runtime
            .block_on(self.client.register(subject, schema))
            .with_context(|| format!("registering {subject} at {}", self.url))
    }

    pub fn schema(&self, id: u32) -> anyhow::Result<Arc<AvroSchema>> {
        self.runtime
            .block_on(self.client.schema_by_id(id))
            .with_context(|| format!("schema id {id} at {}", self.url))
    }
}

/// Registers [`EVENT_SCHEMA`] under `<topic>-value` and loads `input` into `topic`
/// as Avro records framed with its id (2 partitions, keyed by event_id), unless the
/// topic already holds `events` records written with that id.
pub fn load_once(
    brokers: &str,
    registry: &Registry,
    topic: &str,
    input: &Path,
    events: u64,
    data: &crate::GenArgs,
) -> anyhow::Result<u32> {
    let id = registry.register(&format!("{topic}-value"), EVENT_SCHEMA)?;
    if let Some((2, n)) = drive::records(brokers, topic)?
        && n as u64 == events
        && first_schema_id(brokers, topic)? == Some(id)
    {
        return Ok(id);
    }
    eprintln!("[S12] loading {events} events into {topic} as Avro (schema id {id})");
    let shape = Shape::new(AvroSchema::parse_str(EVENT_SCHEMA)?)
        .map_err(|e| anyhow::anyhow!("the events' schema: {e}"))?;
    crate::kafka::load_with(
        &crate::kafka::LoadArgs {
            brokers: brokers.to_owned(),
            topic: topic.into(),
            partitions: 2,
            input: Some(input.to_path_buf()),
            key_field: "event_id".into(),
            records: None,
            data: data.clone(),
        },
        |line| {
            let event: serde_json::Value = serde_json::from_str(line)?;
            Ok(keystone_avro::encode(&event, &shape, id)?)
        },
    )?;
    Ok(id)
}

/// The schema id of the first record of partition 0, if any.
fn first_schema_id(brokers: &str, topic: &str) -> anyhow::Result<Option<u32>> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("keystone-bench-peek-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg?;
            return Ok(
                keystone_avro::wire::split(msg.payload().unwrap_or_default())
                    .ok()
                    .map(|(id, _)| id),
            );
        }
    }
    Ok(None)
}

/// Keystone's plan for one S12 run: the manifest renamed as for S5, its
/// `spec.schemaRegistry` the given registry, the source's reader schema the
/// subject's latest version, the sink's schema derived from the output contract
/// (registered by the runtime when it starts). Returns the plan (JSON) and the
/// topics it creates.
pub fn keystone_plan(
    manifest: &Path,
    name: &str,
    out_topic: &str,
    source_topic: &str,
    source_partitions: i32,
    registry: &Registry,
) -> anyhow::Result<(String, Vec<TopicSpec>)> {
    let text = drive::renamed_manifest(manifest, name, out_topic, source_topic)?;
    let manifests = keystone_crds::parse_manifests(&manifest.display().to_string(), &text)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pipeline = manifests.pipelines.first().context("no pipeline")?.clone();
    let spec = SchemaRegistrySpec {
        url: registry.url.clone(),
        credentials_secret: None,
        ca_secret: None,
    };
    pipeline.spec.schema_registry = Some(spec.clone());
    let reader = registry
        .runtime
        .block_on(keystone_avro::plan::reader_from_registry(
            &registry.client,
            &pipeline,
        ))
        .map_err(|e| anyhow::anyhow!("the source's reader schema: {e}"))?;
    let Some(reader) = reader else {
        bail!("{}: the source is not format: avro", manifest.display());
    };
    let mut plan = keystone_crds::compile_with_facts(
        &pipeline,
        &[],
        &keystone_crds::SourceFacts {
            table: None,
            registered: Some(&reader.registered),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    keystone_avro::plan::complete_plan(&mut plan, &spec, Some(&reader)).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let topics = drive::plan_topics(&plan, source_partitions);
    Ok((serde_json::to_string_pretty(&plan)?, topics))
}

/// The watcher's reader of framed Avro values: each writer schema fetched by id
/// once, the datum decoded to its JSON event.
pub struct Decoder {
    registry: Registry,
    shapes: HashMap<u32, (Arc<AvroSchema>, Shape)>,
}

impl Decoder {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            registry: Registry::new(url)?,
            shapes: HashMap::new(),
        })
    }

    pub fn decode(&mut self, bytes: &[u8]) -> anyhow::Result<serde_json::Value> {
        let (id, datum) = keystone_avro::wire::split(bytes)?;
        if !self.shapes.contains_key(&id) {
            let schema = self.registry.schema(id)?;
            let shape = Shape::new((*schema).clone())
                .map_err(|e| anyhow::anyhow!("schema id {id}: {e}"))?;
            self.shapes.insert(id, (schema, shape));
        }
        let (schema, shape) = &self.shapes[&id];
        Ok(keystone_avro::decode(id, datum, schema, shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generated event encodes with the schema, and reads back as the same
    /// event (canonical JSON: what the digests compare).
    #[test]
    fn generated_events_round_trip_through_the_schema() {
        let shape =
            Shape::new(AvroSchema::parse_str(EVENT_SCHEMA).expect("schema")).expect("shape");
        let config = crate::generate::GenConfig {
            seed: 7,
            events: 500,
            cdc: 0,
            table_rows: 10,
            dup_per_mille: 200,
        };
        let mut n = 0;
        crate::generate::events(&config, &mut |line: &str| {
            let event: serde_json::Value = serde_json::from_str(line).expect("JSON");
            let framed = keystone_avro::encode(&event, &shape, 42).expect("encodes");
            let (id, datum) = keystone_avro::wire::split(&framed).expect("framed");
            assert_eq!(id, 42);
            let back = keystone_avro::decode(id, datum, shape.schema(), &shape).expect("decodes");
            assert_eq!(
                crate::digest::canonical(&back),
                crate::digest::canonical(&event)
            );
            n += 1;
            Ok(())
        })
        .expect("generate");
        assert_eq!(n, 500);
    }
}
