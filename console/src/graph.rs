//! A pipeline's plan drawn as a graph (SVG): the source topic, each stage with
//! its steps, the repartition topics between stages, the sinks, and below them
//! the changelog topics of stateful steps and the dead-letter topic.

use keystone_crds::Plan;
use keystone_crds::plan::StageOutput;
use maud::{Markup, html};
use serde_json::Value;

const COLUMN: i32 = 200;
const BOX_WIDTH: i32 = 170;
const LINE: i32 = 16;

struct Node {
    class: &'static str,
    title: String,
    lines: Vec<String>,
}

/// The plan's graph, with a text list of the same for screen readers.
pub fn draw(plan: &Plan) -> Markup {
    let mut columns: Vec<Node> = vec![Node {
        class: "topic",
        title: "source".to_owned(),
        lines: vec![plan.source.topic.clone()],
    }];
    let mut below: Vec<(usize, Node)> = Vec::new();
    for stage in &plan.stages {
        let lines = stage
            .steps
            .iter()
            .map(|step| {
                let kind = step.operator.single().map(|op| op.kind()).unwrap_or("step");
                match &step.processor {
                    Some(processor) => format!("{} ({kind}, {processor})", step.name),
                    None => format!("{} ({kind})", step.name),
                }
            })
            .collect();
        columns.push(Node {
            class: "stage",
            title: format!("stage {} ×{}", stage.name, stage.parallelism),
            lines,
        });
        let stage_column = columns.len() - 1;
        for step in &stage.steps {
            if let Some(state) = &step.state {
                below.push((
                    stage_column,
                    Node {
                        class: "topic",
                        title: format!("changelog of {}", step.name),
                        lines: vec![state.changelog_topic.clone()],
                    },
                ));
            }
        }
        if let StageOutput::Repartition { topic, key } = &stage.output {
            columns.push(Node {
                class: "topic",
                title: format!("repartition by {}", key.join(", ")),
                lines: vec![topic.clone()],
            });
        }
    }
    let sinks: Vec<Node> = plan
        .sinks
        .iter()
        .map(|sink| Node {
            class: "sink",
            title: format!("sink {}", sink.name),
            lines: vec![sink_kind(&sink.spec)],
        })
        .collect();
    let stage_columns = columns.len();
    let height_of = |node: &Node| 28 + LINE * node.lines.len() as i32;
    let main_height = columns
        .iter()
        .map(height_of)
        .chain(sinks.iter().map(height_of))
        .max()
        .unwrap_or(40)
        .max(sinks.iter().map(height_of).sum::<i32>() + 10 * sinks.len() as i32);
    let below_top = main_height + 40;
    let dead_letter_top = below_top
        + below
            .iter()
            .map(|(_, n)| height_of(n) + 10)
            .max()
            .unwrap_or(0)
        + 10;
    let width = COLUMN * (stage_columns as i32 + 1) + 20;
    let height = dead_letter_top + 60;
    let x_of = |column: usize| 10 + COLUMN * column as i32;
    let mut svg = String::new();
    for (i, node) in columns.iter().enumerate() {
        svg.push_str(&node_svg(node, x_of(i), 10));
        if i + 1 < columns.len() {
            svg.push_str(&edge(x_of(i) + BOX_WIDTH, 24, x_of(i + 1), 24));
        }
    }
    let mut y = 10;
    for sink in &sinks {
        svg.push_str(&node_svg(sink, x_of(stage_columns), y));
        svg.push_str(&edge(
            x_of(stage_columns - 1) + BOX_WIDTH,
            24,
            x_of(stage_columns),
            y + 14,
        ));
        y += height_of(sink) + 10;
    }
    for (column, node) in &below {
        svg.push_str(&node_svg(node, x_of(*column), below_top));
        svg.push_str(&edge(
            x_of(*column) + 80,
            main_height,
            x_of(*column) + 80,
            below_top,
        ));
    }
    svg.push_str(&node_svg(
        &Node {
            class: "topic dlq",
            title: "dead letters".to_owned(),
            lines: vec![plan.dead_letter_topic.clone()],
        },
        x_of(1),
        dead_letter_top,
    ));
    html! {
        div.graph {
            svg width=(width) height=(height) viewBox=(format!("0 0 {width} {height}")) role="img"
                aria-labelledby="graph-title" {
                title #graph-title { "The plan of " (plan.pipeline) }
                defs {
                    marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto" {
                        path d="M 0 0 L 10 5 L 0 10 z" fill="#98a2b3" {}
                    }
                }
                (maud::PreEscaped(svg))
            }
        }
        details {
            summary { "The plan as text" }
            ol {
                li { "Source topic " code { (plan.source.topic) } }
                @for stage in &plan.stages {
                    li {
                        "Stage " (stage.name) " (" (stage.parallelism) " instances): "
                        (stage.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" → "))
                        @if let StageOutput::Repartition { topic, .. } = &stage.output { ", then topic " code { (topic) } }
                    }
                }
                @for sink in &plan.sinks { li { "Sink " (sink.name) " (" (sink_kind(&sink.spec)) ")" } }
                li { "Dead letters to " code { (plan.dead_letter_topic) } }
            }
        }
    }
}

/// The kind of a sink ("kafka", "elasticsearch", …) and its target when it has
/// an obvious one.
fn sink_kind<T: serde::Serialize>(spec: &T) -> String {
    let value = serde_json::to_value(spec).unwrap_or(Value::Null);
    let Some(object) = value.as_object() else {
        return "sink".to_owned();
    };
    for (kind, config) in object {
        if kind == "name" || !config.is_object() {
            continue;
        }
        let target = ["topic", "index", "table", "path"]
            .iter()
            .find_map(|k| config.get(*k).and_then(Value::as_str));
        return match target {
            Some(target) => format!("{kind}: {target}"),
            None => kind.clone(),
        };
    }
    "sink".to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn node_svg(node: &Node, x: i32, y: i32) -> String {
    let height = 28 + LINE * node.lines.len() as i32;
    let mut out = format!(
        r#"<g class="node {}"><rect x="{x}" y="{y}" width="{BOX_WIDTH}" height="{height}" rx="4"/><text x="{}" y="{}" font-weight="600">{}</text>"#,
        node.class,
        x + 8,
        y + 18,
        escape(&clip(&node.title))
    );
    for (i, line) in node.lines.iter().enumerate() {
        out.push_str(&format!(
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 8,
            y + 36 + LINE * i as i32,
            escape(&clip(line))
        ));
    }
    out.push_str("</g>");
    out
}

/// Long names are cut to fit a box; the text list below has them whole.
fn clip(text: &str) -> String {
    const MAX: usize = 26;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(MAX - 1).collect::<String>())
    }
}

fn edge(x1: i32, y1: i32, x2: i32, y2: i32) -> String {
    format!(r#"<path class="edge" d="M {x1} {y1} L {x2} {y2}"/>"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_draws_its_topics_stages_steps_and_sinks() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/orders-join-customers.yaml"
        ))
        .unwrap();
        let reading = keystone_crds::Reading::parse("sample", &text);
        let plan = reading.compile(0).expect("the sample compiles");
        let html = draw(&plan).into_string();
        assert!(html.contains(&plan.source.topic));
        assert!(html.contains(&plan.dead_letter_topic));
        for stage in &plan.stages {
            for step in &stage.steps {
                assert!(html.contains(&step.name), "step {}", step.name);
            }
        }
        for sink in &plan.sinks {
            assert!(html.contains(&format!("sink {}", sink.name)));
        }
        assert!(html.contains("role=\"img\""));
    }

    #[test]
    fn text_in_the_svg_is_escaped_and_clipped() {
        assert_eq!(escape("a<b>&\""), "a&lt;b&gt;&amp;&quot;");
        assert_eq!(clip("short"), "short");
        assert_eq!(clip(&"x".repeat(40)).chars().count(), 26);
    }
}
