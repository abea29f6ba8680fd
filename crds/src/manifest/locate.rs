//! Where each field of a YAML document is: a map from field paths such as
//! `spec.steps[2].dedup.key` to lines and columns.
//!
//! serde_yaml_ng gives positions for syntax errors only, so the documents are
//! parsed a second time with an event parser that marks every node. The same pass
//! splits a file into documents and carries on past a document whose syntax is
//! broken, so that the documents after it are still read.

use granit_parser::{Event, Parser, ScalarStyle, Span};

/// A place in a file; both 1-based, lines counted from the start of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn of(span: &Span) -> Position {
        Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

#[derive(Clone, Debug)]
enum Node {
    /// A scalar, or an alias (whose target is not followed: a path through an
    /// alias stops at it).
    Leaf(Position),
    /// A `|` or `>` scalar: its text starts on the line after its key, so the key
    /// is where it is named.
    BlockScalar(Position),
    Sequence(Position, Vec<Node>),
    Mapping(Position, Vec<Entry>),
}

#[derive(Clone, Debug)]
struct Entry {
    /// The key as written when it is a scalar; a complex key never matches a path.
    key: Option<String>,
    key_at: Position,
    value: Node,
}

impl Node {
    fn position(&self) -> Position {
        match self {
            Node::Leaf(at)
            | Node::BlockScalar(at)
            | Node::Sequence(at, _)
            | Node::Mapping(at, _) => *at,
        }
    }
}

/// The positions of one document's nodes.
#[derive(Clone, Debug)]
pub struct Locations {
    /// Where the document's content starts, for paths that match nothing.
    start: Position,
    root: Option<Node>,
}

impl Locations {
    /// The position of `path` in the document: of a scalar value, of the key of a
    /// map or sequence (the line that names the field), of a sequence item. A path
    /// that goes further than the document (a missing field) is placed at the
    /// deepest part of it that exists; an empty path at the document's start.
    pub fn locate(&self, path: &str) -> Position {
        let Some(mut node) = self.root.as_ref() else {
            return self.start;
        };
        let mut at = self.start;
        let segments = segments(path);
        let mut rest = segments.as_slice();
        while let Some(segment) = rest.first() {
            match (node, segment) {
                (Node::Sequence(_, items), Segment::Index(index)) => match items.get(*index) {
                    Some(item) => {
                        node = item;
                        at = item.position();
                        rest = &rest[1..];
                    }
                    None => break,
                },
                (Node::Mapping(_, entries), Segment::Key(_)) => {
                    let Some((entry, used)) = find_entry(entries, rest) else {
                        break;
                    };
                    node = &entry.value;
                    at = match &entry.value {
                        Node::Leaf(value_at) => *value_at,
                        _ => entry.key_at,
                    };
                    rest = &rest[used..];
                }
                _ => break,
            }
        }
        at
    }

    /// The position of the key that names the last part of `path` (where an
    /// unknown field is written), or of what [`Self::locate`] finds when that is
    /// not a map key.
    pub fn locate_key(&self, path: &str) -> Position {
        let segments = segments(path);
        if let Some((last, parent)) = segments.split_last()
            && let Segment::Key(_) = last
            && let Some(Node::Mapping(_, entries)) = self.node(parent)
            && let Some((entry, used)) = find_entry(entries, std::slice::from_ref(last))
            && used == 1
        {
            return entry.key_at;
        }
        self.locate(path)
    }

    fn node(&self, segments: &[Segment]) -> Option<&Node> {
        let mut node = self.root.as_ref()?;
        let mut rest = segments;
        while let Some(segment) = rest.first() {
            match (node, segment) {
                (Node::Sequence(_, items), Segment::Index(index)) => {
                    node = items.get(*index)?;
                    rest = &rest[1..];
                }
                (Node::Mapping(_, entries), Segment::Key(_)) => {
                    let (entry, used) = find_entry(entries, rest)?;
                    node = &entry.value;
                    rest = &rest[used..];
                }
                _ => return None,
            }
        }
        Some(node)
    }
}

/// The entry named by the first key segments of `path`. Keys may hold dots
/// (`app.kubernetes.io/name`), so when no key equals the first segment, keys equal
/// to several segments joined with dots match; returns how many were used.
fn find_entry<'a>(entries: &'a [Entry], path: &[Segment]) -> Option<(&'a Entry, usize)> {
    let mut joined = String::new();
    for (used, segment) in path.iter().enumerate() {
        let Segment::Key(key) = segment else {
            break;
        };
        if used > 0 {
            joined.push('.');
        }
        joined.push_str(key);
        if let Some(entry) = entries
            .iter()
            .find(|entry| entry.key.as_deref() == Some(joined.as_str()))
        {
            return Some((entry, used + 1));
        }
    }
    None
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `spec.steps[2].dedup.key` as keys and indexes. serde_path_to_error writes `?`
/// for a part it cannot name, which matches nothing and so stops the walk there.
fn segments(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|part| !part.is_empty()) {
        let (key, mut indexes) = match part.find('[') {
            Some(open) => (&part[..open], &part[open..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        while let Some(inner) = indexes.strip_prefix('[') {
            let Some(close) = inner.find(']') else {
                break;
            };
            match inner[..close].parse() {
                Ok(index) => segments.push(Segment::Index(index)),
                Err(_) => segments.push(Segment::Key(inner[..close].to_owned())),
            }
            indexes = &inner[close + 1..];
        }
    }
    segments
}

/// One document of a file, as the event parser saw it.
#[derive(Clone, Debug)]
pub struct DocumentSource {
    /// The first line of the document (of its `---` when it has one).
    pub first_line: usize,
    /// The line after its last (exclusive; the next document's first line).
    pub end_line: usize,
    pub outcome: Result<Locations, SyntaxError>,
}

/// A YAML syntax error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub at: Position,
    pub message: String,
}

impl DocumentSource {
    /// The document's text: its lines of `text`.
    pub fn text<'a>(&self, text: &'a str) -> &'a str {
        let start = line_offset(text, self.first_line);
        let end = line_offset(text, self.end_line);
        &text[start..end.max(start)]
    }
}

/// The byte offset where 1-based `line` starts (the text's length past its end).
fn line_offset(text: &str, line: usize) -> usize {
    if line <= 1 {
        return 0;
    }
    text.match_indices('\n')
        .nth(line - 2)
        .map_or(text.len(), |(offset, _)| offset + 1)
}

/// Splits `text` into its documents and locates every node of each. A document
/// with a syntax error ends at the next `---`; parsing resumes there.
pub fn documents(text: &str) -> Vec<DocumentSource> {
    let mut parser = Parser::new_from_str(text);
    let mut documents: Vec<DocumentSource> = Vec::new();
    let mut builder = Builder::default();
    let mut open: Option<(usize, Position)> = None;
    loop {
        match parser.next_event() {
            None => break,
            Some(Ok((event, span))) => match event {
                Event::DocumentStart(..) => {
                    let at = Position::of(&span);
                    open = Some((at.line, at));
                    builder = Builder::default();
                }
                Event::DocumentEnd => {
                    if let Some((first_line, start)) = open.take() {
                        let root = builder.root.take();
                        documents.push(DocumentSource {
                            first_line,
                            end_line: usize::MAX,
                            outcome: Ok(Locations {
                                start: root.as_ref().map_or(start, Node::position),
                                root,
                            }),
                        });
                    }
                }
                Event::StreamEnd => break,
                other => builder.event(other, &span),
            },
            Some(Err(error)) => {
                let at = Position {
                    line: error.marker().line(),
                    column: error.marker().col() + 1,
                };
                let first_line = open.take().map_or(at.line, |(line, _)| line);
                documents.push(DocumentSource {
                    first_line,
                    end_line: usize::MAX,
                    outcome: Err(SyntaxError {
                        at,
                        message: error.info().to_owned(),
                    }),
                });
                builder = Builder::default();
                // The documents after a broken one are still worth reading; a
                // failure to resume (the input itself) leaves nothing to read.
                match parser.proceed_next_document() {
                    Ok(true) => {}
                    Ok(false) | Err(_) => break,
                }
            }
        }
    }
    // The first document also holds the comments before it; each document runs
    // to the line before the next one starts.
    if let Some(first) = documents.first_mut() {
        first.first_line = 1;
    }
    let total_lines = text.lines().count() + 1;
    for i in 0..documents.len() {
        let next = documents
            .get(i + 1)
            .map_or(total_lines + 1, |d| d.first_line);
        documents[i].end_line = next.max(documents[i].first_line);
    }
    documents
}

/// Builds the node tree from a document's events.
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
}

enum Open {
    Sequence(Position, Vec<Node>),
    /// A mapping, and the key read whose value comes next.
    Mapping(Position, Vec<Entry>, Option<(Option<String>, Position)>),
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: &Span) {
        let at = Position::of(span);
        match event {
            Event::Scalar(value, style, ..) => {
                let node = match style {
                    ScalarStyle::Literal | ScalarStyle::Folded => Node::BlockScalar(at),
                    _ => Node::Leaf(at),
                };
                self.node(node, Some(value.into_owned()))
            }
            Event::Alias(_) | Event::UnresolvedAlias(_) => self.node(Node::Leaf(at), None),
            Event::SequenceStart(..) => self.stack.push(Open::Sequence(at, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Open::Mapping(at, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Open::Sequence(at, items)) => self.node(Node::Sequence(at, items), None),
                Some(Open::Mapping(at, entries, _)) => self.node(Node::Mapping(at, entries), None),
                None => {}
            },
            // Comments, anchors and other presentation events are no nodes.
            _ => {}
        }
    }

    /// A complete node; `scalar` is its text when it is a scalar (a key candidate).
    fn node(&mut self, node: Node, scalar: Option<String>) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Sequence(_, items)) => items.push(node),
            Some(Open::Mapping(_, entries, pending)) => match pending.take() {
                None => *pending = Some((scalar, node.position())),
                Some((key, key_at)) => entries.push(Entry {
                    key,
                    key_at,
                    value: node,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, column: usize) -> Position {
        Position { line, column }
    }

    fn one(text: &str) -> Locations {
        let mut documents = documents(text);
        assert_eq!(documents.len(), 1, "{documents:?}");
        documents.remove(0).outcome.unwrap()
    }

    const NESTED: &str = "\
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: p
  labels:
    app.kubernetes.io/name: shop
spec:
  source:
    topic: in
  steps:
    - name: once
      dedup:
        key: [id, seq]
        window: 1m
    -   name: second
        filter: {expression: 'x > 1', extra: {deep: true}}
";

    #[test]
    fn nested_maps_point_at_values_and_keys() {
        let doc = one(NESTED);
        assert_eq!(doc.locate("kind"), at(2, 7));
        assert_eq!(doc.locate("metadata.name"), at(4, 9));
        // A map value is located at its key, the line that names it.
        assert_eq!(doc.locate("spec.source"), at(8, 3));
        assert_eq!(doc.locate("spec.source.topic"), at(9, 12));
    }

    #[test]
    fn sequences_of_maps() {
        let doc = one(NESTED);
        assert_eq!(doc.locate("spec.steps[0]"), at(11, 7));
        assert_eq!(doc.locate("spec.steps[0].dedup.window"), at(14, 17));
        assert_eq!(doc.locate("spec.steps[0].dedup.key"), at(13, 9));
        assert_eq!(doc.locate("spec.steps[0].dedup.key[1]"), at(13, 19));
        assert_eq!(doc.locate("spec.steps[1].name"), at(15, 15));
    }

    #[test]
    fn flow_style() {
        let doc = one(NESTED);
        assert_eq!(doc.locate("spec.steps[1].filter.expression"), at(16, 30));
        assert_eq!(doc.locate("spec.steps[1].filter.extra.deep"), at(16, 53));
        assert_eq!(doc.locate_key("spec.steps[1].filter.extra"), at(16, 39));
    }

    #[test]
    fn keys_with_dots() {
        let doc = one(NESTED);
        assert_eq!(
            doc.locate("metadata.labels.app.kubernetes.io/name"),
            at(6, 29)
        );
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_parent() {
        let doc = one(NESTED);
        assert_eq!(doc.locate("spec.source.schema.fields[0]"), at(8, 3));
        assert_eq!(doc.locate("spec.steps[7].name"), at(10, 3));
        assert_eq!(doc.locate("spec.steps[0].?.x"), at(11, 7));
        assert_eq!(doc.locate("nothing"), at(1, 1));
        assert_eq!(doc.locate(""), at(1, 1));
        // Through a scalar: the scalar itself.
        assert_eq!(doc.locate("kind.deeper"), at(2, 7));
    }

    #[test]
    fn unknown_keys_are_located_at_the_key() {
        let doc = one(NESTED);
        assert_eq!(doc.locate_key("spec.source.topic"), at(9, 5));
        assert_eq!(doc.locate_key("spec.steps[0].dedup.window"), at(14, 9));
        // Not there at all: its parent.
        assert_eq!(doc.locate_key("spec.source.partitons"), at(8, 3));
    }

    #[test]
    fn multiple_documents_have_file_lines() {
        let text = "# leading comment\nkind: A\nvalue: 1\n---\nkind: B\nnested:\n  value: 2\n---\n---\nkind: C\n";
        let documents = documents(text);
        assert_eq!(documents.len(), 4, "{documents:?}");
        let second = documents[1].outcome.as_ref().unwrap();
        assert_eq!(second.locate("nested.value"), at(7, 10));
        assert_eq!(documents[1].first_line, 4);
        assert_eq!(documents[1].end_line, 8);
        assert_eq!(
            documents[1].text(text),
            "---\nkind: B\nnested:\n  value: 2\n"
        );
        assert_eq!(
            documents[0].text(text),
            "# leading comment\nkind: A\nvalue: 1\n"
        );
        assert_eq!(documents[3].text(text), "---\nkind: C\n");
        assert_eq!(
            documents[3].outcome.as_ref().unwrap().locate("kind"),
            at(10, 7)
        );
    }

    #[test]
    fn block_scalars() {
        let text =
            "a:\n  script: |\n    line one\n    line two\n  after: >-\n    folded\n  last: 3\n";
        let doc = one(text);
        // At the key: the text starts on the next line.
        assert_eq!(doc.locate("a.script"), at(2, 3));
        assert_eq!(doc.locate("a.after"), at(5, 3));
        assert_eq!(doc.locate("a.last"), at(7, 9));
    }

    #[test]
    fn a_broken_document_does_not_hide_the_next() {
        let text = "a: 1\n---\nb: [1, 2\nc: 3\n---\nd: {e: 4}\n";
        let documents = documents(text);
        assert_eq!(documents.len(), 3, "{documents:?}");
        assert!(documents[0].outcome.is_ok());
        let error = documents[1].outcome.as_ref().unwrap_err();
        assert!(error.at.line >= 3 && error.at.line <= 5, "{error:?}");
        assert_eq!(
            documents[2].outcome.as_ref().unwrap().locate("d.e"),
            at(6, 8)
        );
        assert_eq!(documents[2].text(text), "---\nd: {e: 4}\n");
    }
}
