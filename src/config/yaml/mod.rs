//! A YAML document as a tree that remembers where every value was written, `${VAR}`
//! expansion on that tree, and a serde `Deserializer` over it.
//!
//! serde_yaml forgets positions once a value is parsed, and its errors carry neither the
//! key path nor a position for errors raised by our own types (addresses, durations). So
//! the text is parsed once with `saphyr-parser`, which reports positions for every event,
//! into [`Node`]s; each error raised while deserializing is tagged on its way out with the
//! position of the innermost node that saw it and the key path down to that node.
//!
//! Scalars are deserialized by the type asked for (as serde_yaml does with text): a string
//! field accepts `12345`, an integer field accepts `"8088"`. Only where the target type
//! does not decide (`Option`, `deserialize_any`) does the YAML core schema apply, and then
//! only to plain scalars: a quoted `"~"` or a value that came from `${VAR}` is never null.
//!
//! Here: the tree ([`Node`], [`Pos`]) and the parser; `env.rs`: `${VAR}` expansion;
//! `de.rs`: the deserializer and its located errors.

mod de;
mod env;
#[cfg(test)]
mod tests;

pub(crate) use de::from_node;
pub(crate) use env::expand_env;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use std::collections::HashMap;

/// Nesting deeper than this is refused rather than risking the stack on hostile input.
const MAX_DEPTH: usize = 64;
/// Bound on nodes after alias expansion, so a "billion laughs" file cannot exhaust memory.
const MAX_NODES: usize = 200_000;

/// A position in the text: line and column, both counted from 1 (column in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// One value of the document and where it starts.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Scalar {
    pub text: String,
    /// Written without quotes and not produced by `${VAR}`: only such a scalar can be null.
    pub plain: bool,
}

/// A mapping entry; keys are always strings in this file format.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    fn size(&self) -> usize {
        match &self.kind {
            Kind::Scalar(_) => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => 1 + entries.iter().map(|e| e.value.size()).sum::<usize>(),
        }
    }

    fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar(s) if s.plain && is_null_text(&s.text))
    }

    /// Every value position by key path (`a.b`, `a[0].b`; the root is `""`).
    pub(crate) fn positions(&self) -> HashMap<String, Pos> {
        let mut out = HashMap::new();
        self.collect_positions(String::new(), &mut out);
        out
    }

    fn collect_positions(&self, path: String, out: &mut HashMap<String, Pos>) {
        match &self.kind {
            Kind::Scalar(_) => {}
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    item.collect_positions(index_path(&path, i), out);
                }
            }
            Kind::Map(entries) => {
                for e in entries {
                    e.value.collect_positions(key_path(&path, &e.key), out);
                }
            }
        }
        out.insert(path, self.pos);
    }
}

pub(super) fn is_null_text(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// `parent.key`, or `key` at the root.
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[i]`.
pub(crate) fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// A problem with a position (when one is known) and a key path (empty for the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    pub pos: Option<Pos>,
    pub path: String,
    pub message: String,
}

impl Located {
    fn new(pos: Pos, path: &str, message: impl Into<String>) -> Located {
        Located {
            pos: Some(pos),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Parses the text into a tree; `Ok(None)` when it holds no value at all (empty, only
/// comments, or a lone null), which the caller reports as an empty file.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, Located> {
    parse_events(text).map_err(|e| point_at_unclosed(text, e))
}

/// A syntax error inside a flow collection (`[...]`, `{...}`) that was never closed is
/// reported by the parser where it gave up, often lines later: point at the bracket
/// instead, and say where the parser stopped.
fn point_at_unclosed(text: &str, e: Located) -> Located {
    let Some(at) = e.pos else {
        return e;
    };
    if !e.message.starts_with("invalid YAML") {
        return e;
    }
    let Some((open, line, column)) = unclosed_bracket(text, at) else {
        return e;
    };
    Located {
        pos: Some(Pos { line, column }),
        path: e.path,
        message: format!(
            "invalid YAML: this `{open}` is not closed (the parser stopped at {}:{}: {})",
            at.line,
            at.column,
            e.message.trim_start_matches("invalid YAML: ")
        ),
    }
}

/// The innermost flow bracket still open at `stop` (1-based line and column), outside
/// quotes and comments: the bracket and its position.
fn unclosed_bracket(text: &str, stop: Pos) -> Option<(char, usize, usize)> {
    let mut open: Vec<(char, usize, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if line > stop.line {
            break;
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (j, c) in raw.chars().enumerate() {
            let column = j + 1;
            if line == stop.line && column >= stop.column {
                break;
            }
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') if !prev.is_alphanumeric() => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => open.push((c, line, column)),
                (None, ']' | '}') => {
                    open.pop();
                }
                _ => {}
            }
            prev = c;
        }
    }
    open.pop()
}

fn parse_events(text: &str) -> Result<Option<Node>, Located> {
    let mut b = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
    };
    let mut root: Option<Node> = None;
    loop {
        let (event, span) = b.next()?;
        match event {
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                if root.is_some() {
                    return Err(Located::new(
                        Pos::of(&span),
                        "",
                        "more than one YAML document in the file (remove the second `---`)",
                    ));
                }
                let (event, span) = b.next()?;
                root = Some(b.node(event, span, "", 0)?);
            }
            // StreamStart, DocumentEnd and the parser's internal placeholder carry nothing.
            _ => {}
        }
    }
    Ok(root.filter(|n| !n.is_null()))
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// Anchored nodes by the parser's anchor id; an alias is a copy of its anchor.
    anchors: HashMap<usize, Node>,
    nodes: usize,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), Located> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(scan_error(&e)),
            None => Err(Located {
                pos: None,
                path: String::new(),
                message: "invalid YAML: unexpected end of the file".to_string(),
            }),
        }
    }

    fn count(&mut self, n: usize, pos: Pos, path: &str) -> Result<(), Located> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(Located::new(
                pos,
                path,
                format!("the document is too large (more than {MAX_NODES} values after aliases)"),
            ));
        }
        Ok(())
    }

    fn node(
        &mut self,
        event: Event<'a>,
        span: Span,
        path: &str,
        depth: usize,
    ) -> Result<Node, Located> {
        let pos = Pos::of(&span);
        if depth > MAX_DEPTH {
            return Err(Located::new(pos, path, "nesting is too deep"));
        }
        let (anchor, node) = match event {
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Located::new(pos, path, "alias to an unknown anchor"))?;
                self.count(node.size(), pos, path)?;
                return Ok(node);
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, pos, path)?;
                let mut plain = style == ScalarStyle::Plain;
                if let Some(tag) = tag {
                    // Core-schema tags only restate a type; `!!str` is the one that matters,
                    // as it turns `!!str 8088` into text. Custom tags mean nothing here.
                    if !tag.is_yaml_core_schema() {
                        return Err(Located::new(
                            pos,
                            path,
                            format!("unsupported YAML tag {tag}"),
                        ));
                    }
                    if tag.suffix == "str" {
                        plain = false;
                    }
                }
                let scalar = Scalar {
                    text: text.into_owned(),
                    plain,
                };
                (
                    anchor,
                    Node {
                        pos,
                        kind: Kind::Scalar(scalar),
                    },
                )
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_tag(tag.as_deref(), pos, path)?;
                self.count(1, pos, path)?;
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    let item_path = index_path(path, items.len());
                    items.push(self.node(event, span, &item_path, depth + 1)?);
                }
                (
                    anchor,
                    Node {
                        pos,
                        kind: Kind::Seq(items),
                    },
                )
            }
            Event::MappingStart(anchor, tag) => {
                self.check_tag(tag.as_deref(), pos, path)?;
                self.count(1, pos, path)?;
                let mut entries: Vec<Entry> = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    let key_pos = Pos::of(&span);
                    let key = match event {
                        Event::MappingEnd => break,
                        Event::Scalar(text, ..) => text.into_owned(),
                        _ => {
                            return Err(Located::new(
                                key_pos,
                                path,
                                "mapping keys must be plain strings",
                            ));
                        }
                    };
                    let value_path = key_path(path, &key);
                    if let Some(first) = entries.iter().find(|e| e.key == key) {
                        return Err(Located::new(
                            key_pos,
                            &value_path,
                            format!(
                                "duplicate key {key:?} (first written on line {})",
                                first.key_pos.line
                            ),
                        ));
                    }
                    let (event, span) = self.next()?;
                    let value = self.node(event, span, &value_path, depth + 1)?;
                    entries.push(Entry {
                        key,
                        key_pos,
                        value,
                    });
                }
                (
                    anchor,
                    Node {
                        pos,
                        kind: Kind::Map(entries),
                    },
                )
            }
            _ => return Err(Located::new(pos, path, "invalid YAML: unexpected event")),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }

    fn check_tag(
        &self,
        tag: Option<&saphyr_parser::Tag>,
        pos: Pos,
        path: &str,
    ) -> Result<(), Located> {
        match tag {
            Some(tag) if !tag.is_yaml_core_schema() => Err(Located::new(
                pos,
                path,
                format!("unsupported YAML tag {tag}"),
            )),
            _ => Ok(()),
        }
    }
}

fn scan_error(e: &ScanError) -> Located {
    let m = e.marker();
    Located {
        pos: Some(Pos {
            line: m.line(),
            column: m.col() + 1,
        }),
        path: String::new(),
        message: format!("invalid YAML: {}", e.info()),
    }
}
