//! Cycles between pipelines through their Kafka topics.
//!
//! Each pipeline is checked on its own elsewhere; this looks at all of them at
//! once. Pipeline A feeds pipeline B when one of A's Kafka sinks writes the topic
//! B reads as its source, on the same cluster. Pipelines that feed each other in
//! a ring process their own output again forever. Only sinks and sources make
//! the graph: a table read by `join`/`enrich` is a look-up (a row's arrival
//! emits nothing), and the dead-letter topic holds failures, not the output.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{ContractError, ErrorKind};
use crate::pipeline::Pipeline;

/// A pipeline by namespace and name, shown as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PipelineId {
    pub namespace: String,
    pub name: String,
}

impl PipelineId {
    pub fn of(pipeline: &Pipeline) -> Self {
        Self {
            namespace: pipeline
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            name: pipeline
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "pipeline".to_owned()),
        }
    }
}

impl std::fmt::Display for PipelineId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One sink of a pipeline that closes a refused cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CycleError {
    /// The pipeline the error belongs to.
    pub pipeline: PipelineId,
    /// The other pipelines of the cycle, in the order events flow from this one.
    pub others: Vec<PipelineId>,
    /// `ErrorKind::TopicCycle`, at `spec.sinks[i].kafka.topic`.
    pub error: ContractError,
}

/// A topic as the graph compares it: the cluster (`None` for the default one)
/// and the name.
type TopicRef = (Option<String>, String);

/// Every refused cycle between `pipelines`, as one error per Kafka sink that
/// leads into the cycle, on each pipeline of it that does not set
/// `spec.allowTopicCycles`. A cycle whose pipelines all allow it is accepted.
///
/// `default_cluster` is the name of the cluster a pipeline gets when it names
/// none, so that `cluster: main` and no cluster compare equal when `main` is the
/// default; `None` compares only unset with unset. Pipelines in every namespace
/// count: they share the clusters' topics. Errors are sorted by pipeline and sink.
pub fn topic_cycles(pipelines: &[&Pipeline], default_cluster: Option<&str>) -> Vec<CycleError> {
    let cluster = |c: &Option<String>| -> Option<String> {
        match (c, default_cluster) {
            (Some(c), Some(d)) if c == d => None,
            (c, _) => c.clone(),
        }
    };
    let mut nodes: Vec<(PipelineId, &Pipeline)> =
        pipelines.iter().map(|p| (PipelineId::of(p), *p)).collect();
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    nodes.dedup_by(|a, b| a.0 == b.0);

    let mut readers: BTreeMap<TopicRef, Vec<usize>> = BTreeMap::new();
    for (index, (_, pipeline)) in nodes.iter().enumerate() {
        let source = &pipeline.spec.source;
        readers
            .entry((cluster(&source.cluster), source.topic.clone()))
            .or_default()
            .push(index);
    }
    // edges[a] = (sink index, target) for each Kafka sink of a that another (or the
    // same) pipeline reads.
    let edges: Vec<Vec<(usize, usize)>> = nodes
        .iter()
        .map(|(_, pipeline)| {
            let mut out = Vec::new();
            for (sink_index, sink) in pipeline.spec.sinks.iter().enumerate() {
                let Some(kafka) = &sink.kafka else { continue };
                let topic = (cluster(&kafka.cluster), kafka.topic.clone());
                for &target in readers.get(&topic).into_iter().flatten() {
                    out.push((sink_index, target));
                }
            }
            out
        })
        .collect();

    let components = strongly_connected(&edges);
    let mut errors = Vec::new();
    for component in components {
        let members: BTreeSet<usize> = component.iter().copied().collect();
        let cyclic = members.len() > 1
            || edges[component[0]]
                .iter()
                .any(|(_, target)| *target == component[0]);
        if !cyclic {
            continue;
        }
        let allowed = |i: usize| nodes[i].1.spec.allow_topic_cycles;
        if members.iter().all(|&i| allowed(i)) {
            continue;
        }
        for &from in &members {
            if allowed(from) {
                continue;
            }
            let pipeline = nodes[from].1;
            for &(sink_index, target) in &edges[from] {
                if !members.contains(&target) {
                    continue;
                }
                let route = path_back(&edges, &members, target, from);
                errors.push(cycle_error(&nodes, from, sink_index, &route, pipeline));
            }
        }
    }
    errors.sort_by(|a, b| (&a.pipeline, &a.error.path).cmp(&(&b.pipeline, &b.error.path)));
    errors
}

fn cycle_error(
    nodes: &[(PipelineId, &Pipeline)],
    from: usize,
    sink_index: usize,
    route: &[(usize, usize)],
    pipeline: &Pipeline,
) -> CycleError {
    let sink = &pipeline.spec.sinks[sink_index];
    let topic = sink.kafka.as_ref().map_or("", |k| k.topic.as_str());
    let me = &nodes[from].0;
    let target = route.first().map_or(from, |(node, _)| *node);
    let others: Vec<PipelineId> = route
        .iter()
        .map(|(node, _)| nodes[*node].0.clone())
        .filter(|id| id != me)
        .collect();
    let message = if target == from {
        format!(
            "sink {:?} writes topic {topic:?}, this pipeline's own source: it reads its own output forever; \
             write another topic, or set spec.allowTopicCycles: true if the feedback is intended",
            sink.name
        )
    } else {
        // How events come back: each pipeline on the way and the topic it writes.
        let hops: Vec<String> = route
            .iter()
            .enumerate()
            .map(|(hop, (node, sink))| {
                let written = nodes[*node].1.spec.sinks[*sink]
                    .kafka
                    .as_ref()
                    .map_or("", |k| k.topic.as_str());
                let to = route
                    .get(hop + 1)
                    .map_or("this pipeline's source".to_owned(), |(next, _)| {
                        format!("the source of pipeline {}", nodes[*next].0)
                    });
                format!("pipeline {} writes {written:?}, {to}", nodes[*node].0)
            })
            .collect();
        let blocking: Vec<String> = others
            .iter()
            .filter(|id| {
                nodes
                    .iter()
                    .find(|(n, _)| n == *id)
                    .is_some_and(|(_, p)| !p.spec.allow_topic_cycles)
            })
            .map(ToString::to_string)
            .collect();
        let opt_in = if blocking.is_empty() {
            "set spec.allowTopicCycles: true here if the feedback is intended".to_owned()
        } else {
            format!(
                "set spec.allowTopicCycles: true here and on {} if the feedback is intended",
                blocking.join(", ")
            )
        };
        format!(
            "sink {:?} writes topic {topic:?}, the source of pipeline {}; {}: the pipelines feed each other forever; \
             break the cycle, or {opt_in}",
            sink.name,
            nodes[target].0,
            hops.join("; ")
        )
    };
    CycleError {
        pipeline: me.clone(),
        others,
        error: ContractError {
            kind: ErrorKind::TopicCycle,
            path: format!("spec.sinks[{sink_index}].kafka.topic"),
            subject: Some(sink.name.clone()),
            message,
        },
    }
}

/// The shortest way from `start` back to `goal` inside `members`, as (pipeline,
/// sink it writes with) hops from `start`; empty when `start` is `goal`.
fn path_back(
    edges: &[Vec<(usize, usize)>],
    members: &BTreeSet<usize>,
    start: usize,
    goal: usize,
) -> Vec<(usize, usize)> {
    if start == goal {
        return Vec::new();
    }
    // came_from[node] = (previous node, sink of the previous node).
    let mut came_from: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    let mut seen = BTreeSet::from([start]);
    while let Some(node) = queue.pop_front() {
        for &(sink, next) in &edges[node] {
            if !members.contains(&next) || !seen.insert(next) {
                continue;
            }
            came_from.insert(next, (node, sink));
            if next == goal {
                let mut hops = Vec::new();
                let mut at = goal;
                while let Some(&(previous, sink)) = came_from.get(&at) {
                    hops.push((previous, sink));
                    at = previous;
                }
                hops.reverse();
                return hops;
            }
            queue.push_back(next);
        }
    }
    // Members of one strongly connected component always reach each other.
    Vec::new()
}

/// Tarjan's strongly connected components, each listed once.
fn strongly_connected(edges: &[Vec<(usize, usize)>]) -> Vec<Vec<usize>> {
    struct State {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        components: Vec<Vec<usize>>,
    }
    fn visit(v: usize, edges: &[Vec<(usize, usize)>], s: &mut State) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &(_, w) in &edges[v] {
            match s.index[w] {
                None => {
                    visit(w, edges, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(index) if s.on_stack[w] => s.low[v] = s.low[v].min(index),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort_unstable();
            s.components.push(component);
        }
    }
    let n = edges.len();
    let mut state = State {
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        components: Vec::new(),
    };
    for v in 0..n {
        if state.index[v].is_none() {
            visit(v, edges, &mut state);
        }
    }
    state.components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(
        namespace: &str,
        name: &str,
        source: &str,
        sinks: &[&str],
        allow: bool,
    ) -> Pipeline {
        let sinks: String = sinks
            .iter()
            .enumerate()
            .map(|(i, topic)| format!("    - name: out{i}\n      kafka: {{topic: {topic}}}\n"))
            .collect();
        let yaml = format!(
            "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec:\n  allowTopicCycles: {allow}\n  source:\n    topic: {source}\n    schema: {{fields: []}}\n  sinks:\n{sinks}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    #[test]
    fn two_pipelines_feeding_each_other() {
        let a = pipeline("shop", "a", "a.in", &["b.in"], false);
        let b = pipeline("shop", "b", "b.in", &["a.in", "elsewhere"], false);
        let errors = topic_cycles(&[&a, &b], None);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(errors[0].pipeline.to_string(), "shop/a");
        assert_eq!(errors[0].others, vec![errors[1].pipeline.clone()]);
        assert_eq!(errors[0].error.kind, ErrorKind::TopicCycle);
        assert_eq!(errors[0].error.path, "spec.sinks[0].kafka.topic");
        assert_eq!(
            errors[0].error.message,
            "sink \"out0\" writes topic \"b.in\", the source of pipeline shop/b; \
             pipeline shop/b writes \"a.in\", this pipeline's source: the pipelines feed each other forever; \
             break the cycle, or set spec.allowTopicCycles: true here and on shop/b if the feedback is intended"
        );
        assert_eq!(errors[1].pipeline.to_string(), "shop/b");
        assert_eq!(errors[1].error.path, "spec.sinks[0].kafka.topic");
    }

    #[test]
    fn a_chain_is_not_a_cycle() {
        let a = pipeline("shop", "a", "a.in", &["b.in"], false);
        let b = pipeline("shop", "b", "b.in", &["c.in"], false);
        let c = pipeline("shop", "c", "c.in", &["out"], false);
        assert_eq!(topic_cycles(&[&a, &b, &c], None), Vec::new());
    }

    #[test]
    fn a_three_pipeline_ring_across_namespaces_names_the_way_back() {
        let a = pipeline("one", "a", "a.in", &["b.in"], false);
        let b = pipeline("two", "b", "b.in", &["c.in"], false);
        let c = pipeline("three", "c", "c.in", &["a.in"], false);
        let errors = topic_cycles(&[&c, &a, &b], None);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert_eq!(
            errors[0].error.message,
            "sink \"out0\" writes topic \"b.in\", the source of pipeline two/b; \
             pipeline two/b writes \"c.in\", the source of pipeline three/c; \
             pipeline three/c writes \"a.in\", this pipeline's source: the pipelines feed each other forever; \
             break the cycle, or set spec.allowTopicCycles: true here and on two/b, three/c if the feedback is intended"
        );
    }

    #[test]
    fn a_cycle_is_accepted_only_when_every_pipeline_allows_it() {
        let a = pipeline("shop", "a", "a.in", &["b.in"], true);
        let b = pipeline("shop", "b", "b.in", &["a.in"], true);
        assert_eq!(topic_cycles(&[&a, &b], None), Vec::new());

        let b = pipeline("shop", "b", "b.in", &["a.in"], false);
        let errors = topic_cycles(&[&a, &b], None);
        // Only the pipeline that did not opt in is refused; that breaks the cycle.
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].pipeline.to_string(), "shop/b");
        assert!(
            errors[0]
                .error
                .message
                .ends_with("set spec.allowTopicCycles: true here if the feedback is intended"),
            "{}",
            errors[0].error.message
        );
    }

    #[test]
    fn clusters_must_match_and_the_default_cluster_has_two_spellings() {
        let a = pipeline("shop", "a", "a.in", &["b.in"], false);
        let mut b = pipeline("shop", "b", "b.in", &["a.in"], false);
        b.spec.source.cluster = Some("other".into());
        assert_eq!(topic_cycles(&[&a, &b], None), Vec::new());
        b.spec.source.cluster = Some("main".into());
        assert_eq!(topic_cycles(&[&a, &b], None), Vec::new());
        assert_eq!(topic_cycles(&[&a, &b], Some("main")).len(), 2);
    }

    #[test]
    fn a_pipeline_writing_its_own_source() {
        let a = pipeline("shop", "a", "a.in", &["a.in"], false);
        let errors = topic_cycles(&[&a], None);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].others.is_empty());
        assert!(
            errors[0]
                .error
                .message
                .contains("this pipeline's own source"),
            "{}",
            errors[0].error.message
        );
    }
}
