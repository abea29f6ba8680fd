//! S9: Kafka -> dedup + order + project -> OpenSearch (Elasticsearch bulk API).
//!
//! - The reference: per order, the projected document of its highest sequence
//!   (the last change), at external version `seq`; and how many index actions a
//!   run applies (one per distinct change: redeliveries are dropped by the dedup).
//! - A tiny HTTP/1.1 client on `std::net` (plain `http://` on loopback, keep-alive):
//!   the bench crate takes no HTTP dependency.
//! - The completion rule, the same for every engine: the harness polls the index's
//!   `_stats/indexing` (real time, no refresh needed) every 50 ms for the actions
//!   the index answered (`index_total + index_failed`: a version conflict counts as
//!   failed, the index kept a newer version). The run starts with the first
//!   answered action and ends with the last one: when the count reaches the number
//!   of distinct changes, or else at its last change once it has not moved for
//!   8 s (an engine may apply fewer actions: Keystone's order step drops a change
//!   that arrives after a higher sequence of its order was released, which the
//!   external version would refuse anyway). Then the index is refreshed and every
//!   document is read back (`version: true`) and digested against the reference:
//!   each order's last change at version `seq`; a run that stopped early fails it.
//! - The bulk ceiling (`search-ceiling`): the already-projected documents, per order
//!   in sequence order, sent as 1,000-document bulk requests with external versions
//!   on N concurrent connections (documents routed to a connection by order id, so
//!   one order's versions never race).

// Without the `kafka` feature only the ceiling command is reachable.
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value, json};

use crate::digest::{Digester, Mode, OutputDigest};

/// The fields of an S9 document, from the CDC event (`after.*` flattened).
pub const DOC_FIELDS: [(&str, &str); 6] = [
    ("order_id", "/order_id"),
    ("seq", "/seq"),
    ("op", "/op"),
    ("status", "/after/status"),
    ("amount", "/after/amount"),
    ("customer_id", "/after/customer_id"),
];

/// Index settings every engine's index gets (created by the harness).
pub fn index_body() -> Value {
    json!({
        "settings": {
            "number_of_shards": "1",
            "number_of_replicas": "0",
            "refresh_interval": "-1"
        },
        // What Keystone's sink derives from the pipeline's output schema.
        "mappings": {"properties": {
            "order_id": {"type": "keyword"},
            "seq": {"type": "long"},
            "op": {"type": "keyword"},
            "status": {"type": "keyword"},
            "amount": {"type": "double"},
            "customer_id": {"type": "keyword"}
        }}
    })
}

pub fn project(ev: &Value) -> Value {
    let mut doc = Map::new();
    for (name, pointer) in DOC_FIELDS {
        doc.insert(
            name.to_owned(),
            ev.pointer(pointer).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(doc)
}

/// The record a document is digested as: id, version and source.
fn doc_record(id: &str, version: i64, source: Value) -> Value {
    json!({"id": id, "version": version, "source": source})
}

/// What S9 must produce from the CDC input.
pub struct Reference {
    /// Distinct changes: index actions a run applies.
    pub actions: u64,
    /// Documents the index holds at the end (distinct orders).
    pub documents: u64,
    /// Digest of every final document (id, version, source).
    pub digest: OutputDigest,
    /// The bulk ceiling's input: (order id, seq, document JSON), each order's
    /// changes in ascending sequence, orders interleaved as in the input.
    pub ordered: Vec<(String, i64, String)>,
}

/// Dedup by (order_id, event_id) (redeliveries are byte-identical copies within
/// 1,000 lines, far inside the 10 min window), then the last change per order.
pub fn reference(cdc: &Path) -> anyhow::Result<Reference> {
    let file = std::fs::File::open(cdc).with_context(|| format!("opening {}", cdc.display()))?;
    let mut seen: std::collections::HashSet<(String, String)> = Default::default();
    // Distinct changes in input order: (order, seq, doc).
    let mut distinct: Vec<(String, i64, Value)> = Vec::new();
    for line in BufReader::with_capacity(1 << 20, file).lines() {
        let ev: Value = serde_json::from_str(&line?)?;
        let order = ev["order_id"].as_str().context("order_id")?.to_owned();
        let id = ev["event_id"].as_str().context("event_id")?.to_owned();
        if !seen.insert((order.clone(), id)) {
            continue;
        }
        let seq = ev["seq"].as_i64().context("seq")?;
        distinct.push((order, seq, project(&ev)));
    }
    // Each order's slots in input order, refilled with its changes sorted by seq.
    let mut per_order: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (order, _, _)) in distinct.iter().enumerate() {
        per_order.entry(order.as_str()).or_default().push(i);
    }
    let mut slot_of = vec![0usize; distinct.len()];
    let mut last: Vec<(String, i64, &Value)> = Vec::new();
    for slots in per_order.values() {
        let mut sorted = slots.clone();
        sorted.sort_by_key(|&i| distinct[i].1);
        for (slot, from) in slots.iter().zip(&sorted) {
            slot_of[*slot] = *from;
        }
        let top = &distinct[*sorted.last().expect("non-empty")];
        last.push((top.0.clone(), top.1, &top.2));
    }
    let mut d = Digester::new(Mode::Multiset);
    for (order, seq, doc) in &last {
        d.add_value(&doc_record(order, *seq, (*doc).clone()))?;
    }
    let ordered = slot_of
        .iter()
        .map(|&i| {
            let (o, s, doc) = &distinct[i];
            (o.clone(), *s, doc.to_string())
        })
        .collect();
    Ok(Reference {
        actions: distinct.len() as u64,
        documents: last.len() as u64,
        digest: d.finish(),
        ordered,
    })
}

/// One keep-alive HTTP/1.1 connection to `http://host:port`.
pub struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
}

pub fn host_of(base: &str) -> anyhow::Result<String> {
    let rest = base
        .strip_prefix("http://")
        .with_context(|| format!("{base}: only http:// endpoints"))?;
    Ok(rest.trim_end_matches('/').to_owned())
}

impl Conn {
    pub fn open(base: &str) -> anyhow::Result<Conn> {
        let host = host_of(base)?;
        let stream = TcpStream::connect(&host).with_context(|| format!("connecting to {host}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 16, stream),
            host,
        })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nAccept: application/json\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            out.resize(n, 0);
            self.reader.read_exact(&mut out)?;
        } else if method != "HEAD" {
            self.reader.read_to_end(&mut out)?;
        }
        Ok((status, out))
    }

    pub fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, bytes) = self.request(method, path, "application/json", body.as_bytes())?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, v))
    }
}

pub fn create_index(base: &str, index: &str) -> anyhow::Result<()> {
    let mut c = Conn::open(base)?;
    let _ = c.json("DELETE", &format!("/{index}"), None)?;
    let (status, body) = c.json("PUT", &format!("/{index}"), Some(&index_body()))?;
    if status != 200 {
        bail!("creating index {index}: {status} {body}");
    }
    let (status, body) = c.json(
        "GET",
        &format!("/_cluster/health/{index}?wait_for_status=green&timeout=30s"),
        None,
    )?;
    if status != 200 {
        bail!("index {index} not green: {status} {body}");
    }
    Ok(())
}

pub fn delete_index(base: &str, index: &str) {
    if let Ok(mut c) = Conn::open(base) {
        let _ = c.json("DELETE", &format!("/{index}"), None);
    }
}

/// Index actions the index has answered: indexed plus failed (version conflicts).
pub fn answered(c: &mut Conn, index: &str) -> anyhow::Result<u64> {
    let (status, v) = c.json(
        "GET",
        &format!("/{index}/_stats/indexing?filter_path=_all.primaries.indexing.index_total,_all.primaries.indexing.index_failed"),
        None,
    )?;
    if status != 200 {
        bail!("stats of {index}: {status} {v}");
    }
    let i = &v["_all"]["primaries"]["indexing"];
    Ok(i["index_total"].as_u64().unwrap_or(0) + i["index_failed"].as_u64().unwrap_or(0))
}

/// What the poller saw.
pub struct Applied {
    pub answered: u64,
    /// From the first answered action to the poll that saw the last one.
    pub seconds: f64,
    pub engine_exited_early: bool,
}

/// Polls the index every 50 ms until `expected` actions were answered, the count
/// stalled for `stall` after starting, the engine (`alive`) exited, or `timeout`.
pub fn wait_applied(
    base: &str,
    index: &str,
    expected: u64,
    timeout: Duration,
    stall: Duration,
    alive: impl Fn() -> bool,
) -> anyhow::Result<Applied> {
    let mut c = Conn::open(base)?;
    let deadline = Instant::now() + timeout;
    let mut first: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut at_last_change = Instant::now();
    let mut n = 0;
    let mut exited = false;
    loop {
        let now = Instant::now();
        let seen = match answered(&mut c, index) {
            Ok(x) => x,
            Err(_) => {
                c = Conn::open(base)?;
                answered(&mut c, index)?
            }
        };
        if seen > 0 && first.is_none() {
            first = Some(now);
        }
        if seen != n {
            n = seen;
            last_change = now;
            at_last_change = now;
        }
        if n >= expected || now > deadline {
            break;
        }
        if first.is_some() && now.duration_since(last_change) > stall {
            break;
        }
        if !alive() {
            // One more look: the engine may have answered everything just before.
            if exited {
                break;
            }
            exited = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(first) = first else {
        bail!("no action reached index {index}");
    };
    Ok(Applied {
        answered: n,
        seconds: at_last_change
            .duration_since(first)
            .as_secs_f64()
            .max(0.001),
        engine_exited_early: exited && n < expected,
    })
}

/// Refreshes the index and digests every document (id, version, source).
pub fn read_back(base: &str, index: &str) -> anyhow::Result<OutputDigest> {
    let mut c = Conn::open(base)?;
    let (status, v) = c.json("POST", &format!("/{index}/_refresh"), None)?;
    if status != 200 {
        bail!("refreshing {index}: {status} {v}");
    }
    let mut d = Digester::new(Mode::Multiset);
    let mut after: Option<Value> = None;
    loop {
        let mut q = json!({"size": 10000, "version": true, "sort": [{"order_id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            q["search_after"] = a.clone();
        }
        let (status, v) = c.json("POST", &format!("/{index}/_search"), Some(&q))?;
        if status != 200 {
            bail!("reading {index}: {status} {v}");
        }
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            break;
        }
        for h in &hits {
            let id = h["_id"].as_str().unwrap_or_default();
            let version = h["_version"].as_i64().unwrap_or(-1);
            d.add_value(&doc_record(id, version, h["_source"].clone()))?;
        }
        after = hits.last().map(|h| h["sort"].clone());
    }
    Ok(d.finish())
}

#[derive(Debug, Args)]
pub struct CeilingArgs {
    /// The OpenSearch/Elasticsearch endpoint (http://host:port).
    #[arg(
        long,
        env = "KEYSTONE_OPENSEARCH_URL",
        default_value = "http://127.0.0.1:19200"
    )]
    pub endpoint: String,
    /// The index (it must exist).
    #[arg(long)]
    pub index: String,
    /// The documents: lines of `order_id<TAB>seq<TAB>document JSON`.
    #[arg(long)]
    pub docs: PathBuf,
    /// Documents per bulk request.
    #[arg(long, default_value_t = 1000)]
    pub bulk_size: usize,
    /// Concurrent connections (each sends its requests one after another).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

/// Writes the ceiling's input file.
pub fn write_docs(path: &Path, r: &Reference) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (o, s, doc) in &r.ordered {
        writeln!(w, "{o}\t{s}\t{doc}")?;
    }
    w.flush()?;
    Ok(())
}

fn lane_of(id: &str, lanes: usize) -> usize {
    // FNV-1a: stable and cheap.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h % lanes as u64) as usize
}

/// The plain bulk loader: every document, 1,000 per request, external versions,
/// `concurrency` connections; prints `KSBENCH_JOB_MS` and the documents per second.
pub fn ceiling(args: &CeilingArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.docs)?;
    let lanes = args.concurrency.max(1);
    // Bodies built before the clock starts: the ceiling measures the index.
    let mut per_lane: Vec<Vec<Vec<u8>>> = vec![Vec::new(); lanes];
    let mut current: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); lanes];
    let mut docs = 0u64;
    for line in text.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(id), Some(seq), Some(doc)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("bad line {line:?}");
        };
        let lane = lane_of(id, lanes);
        let (body, n) = &mut current[lane];
        write!(
            body,
            "{{\"index\":{{\"_index\":\"{}\",\"_id\":\"{id}\",\"version\":{seq},\"version_type\":\"external\"}}}}\n{doc}\n",
            args.index
        )?;
        *n += 1;
        docs += 1;
        if *n == args.bulk_size {
            per_lane[lane].push(std::mem::take(body));
            *n = 0;
        }
    }
    for (lane, (body, n)) in current.into_iter().enumerate() {
        if n > 0 {
            per_lane[lane].push(body);
        }
    }
    let start = Instant::now();
    let handles: Vec<_> = per_lane
        .into_iter()
        .map(|bodies| {
            let endpoint = args.endpoint.clone();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut c = Conn::open(&endpoint)?;
                let mut refused = 0;
                for body in bodies {
                    let (status, resp) =
                        c.request("POST", "/_bulk", "application/x-ndjson", &body)?;
                    if status != 200 {
                        bail!("bulk answered {status}: {}", String::from_utf8_lossy(&resp));
                    }
                    let v: Value = serde_json::from_slice(&resp)?;
                    if v["errors"].as_bool() == Some(true) {
                        for item in v["items"].as_array().into_iter().flatten() {
                            let status = item["index"]["status"].as_u64().unwrap_or(0);
                            if status >= 300 && status != 409 {
                                refused += 1;
                            }
                        }
                    }
                }
                Ok(refused)
            })
        })
        .collect();
    let mut refused = 0;
    for h in handles {
        refused += h.join().map_err(|_| anyhow::anyhow!("a lane panicked"))??;
    }
    let s = start.elapsed().as_secs_f64();
    if refused > 0 {
        bail!("{refused} documents refused");
    }
    println!("KSBENCH_JOB_MS {:.0}", s * 1000.0);
    println!(
        "bulk ceiling: {docs} documents in {s:.2}s on {lanes} connections: {:.0} docs/s",
        docs as f64 / s
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_keeps_the_last_change_and_orders_each_key() {
        let dir = std::env::temp_dir().join(format!("ksbench-s9-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cdc = dir.join("cdc.jsonl");
        let ev = |id: &str, order: &str, seq: i64| {
            format!(
                r#"{{"event_id":"{id}","order_id":"{order}","seq":{seq},"op":"u","ts":1,"after":{{"status":"s{seq}","amount":1.5,"customer_id":"c"}}}}"#
            )
        };
        let lines = [
            ev("x1", "a", 2),
            ev("x2", "b", 1),
            ev("x0", "a", 1),
            ev("x1", "a", 2),
            ev("x3", "a", 3),
        ];
        std::fs::write(&cdc, lines.join("\n") + "\n").unwrap();
        let r = reference(&cdc).unwrap();
        assert_eq!(r.actions, 4);
        assert_eq!(r.documents, 2);
        let order: Vec<(String, i64)> = r.ordered.iter().map(|(o, s, _)| (o.clone(), *s)).collect();
        assert_eq!(
            order,
            vec![
                ("a".into(), 1),
                ("b".into(), 1),
                ("a".into(), 2),
                ("a".into(), 3)
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
