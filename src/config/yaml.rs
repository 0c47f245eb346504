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

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use serde::de::{
    self, DeserializeSeed, EnumAccess, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use std::collections::HashMap;
use std::fmt;

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

fn is_null_text(s: &str) -> bool {
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

/// Replaces `${NAME}` in every scalar value (never in keys) with `env(NAME)`; `$${` writes
/// a literal `${`. Working on parsed scalars rather than on the raw text means a variable
/// can only ever become (part of) one string: it cannot add keys, lists or quotes.
/// An expanded scalar counts as quoted, so an empty variable is an empty string, not null.
pub(crate) fn expand_env(
    node: &mut Node,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<Located>,
) {
    match &mut node.kind {
        Kind::Scalar(s) => {
            if !s.text.contains('$') {
                return;
            }
            match expand_str(&s.text, env) {
                Ok(Some(text)) => {
                    s.text = text;
                    s.plain = false;
                }
                Ok(None) => {}
                Err(messages) => {
                    errors.extend(
                        messages
                            .into_iter()
                            .map(|m| Located::new(node.pos, path, m)),
                    );
                }
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &index_path(path, i), env, errors);
            }
        }
        Kind::Map(entries) => {
            for e in entries {
                expand_env(&mut e.value, &key_path(path, &e.key), env, errors);
            }
        }
    }
}

/// `Ok(None)`: nothing to replace. `Err`: one message per bad or missing variable.
fn expand_str(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut changed = false;
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            changed = true;
        } else if let Some(tail) = after.strip_prefix("${") {
            changed = true;
            let Some(end) = tail.find('}') else {
                errors.push(format!("unterminated ${{...}} in {text:?}"));
                return Err(errors);
            };
            let name = &tail[..end];
            if !is_var_name(name) {
                errors.push(format!(
                    "invalid environment variable name {name:?} in {text:?} (write $${{ for a literal ${{)"
                ));
            } else {
                match env(name) {
                    Some(value) => out.push_str(&value),
                    None => errors.push(format!("environment variable {name} is not set")),
                }
            }
            rest = &tail[end + 1..];
        } else {
            // A lone `$` is ordinary text (passwords may contain it).
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if !errors.is_empty() {
        Err(errors)
    } else if changed {
        Ok(Some(out))
    } else {
        Ok(None)
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Deserializes `T` from a tree; the error carries the key path and position.
pub(crate) fn from_node<T: de::DeserializeOwned>(node: &Node) -> Result<T, Located> {
    T::deserialize(NodeDe(node)).map_err(|e| {
        let e = e.locate(node);
        let path = e.path_string();
        Located {
            pos: e.pos,
            path,
            message: e.message,
        }
    })
}

/// Deserialization error being carried outwards; `path` grows as it leaves each level.
#[derive(Debug)]
pub(crate) struct DeError {
    message: String,
    pos: Option<Pos>,
    /// Innermost segment first.
    path: Vec<Segment>,
}

#[derive(Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

impl DeError {
    /// Gives an error raised for `node` itself (no position yet) that node's position,
    /// and replaces the std address parser's messages, which do not quote the value.
    fn locate(mut self, node: &Node) -> Self {
        if self.pos.is_none() {
            self.pos = Some(node.pos);
            if let Kind::Scalar(s) = &node.kind {
                let m = &self.message;
                if m.starts_with("invalid ") && m.ends_with("address syntax") {
                    self.message = if m.contains("socket") {
                        format!("invalid address {:?} (expected ip:port)", s.text)
                    } else {
                        format!("invalid IP address {:?}", s.text)
                    };
                }
            }
        }
        self
    }

    fn within(mut self, segment: Segment) -> Self {
        self.path.push(segment);
        self
    }

    fn path_string(&self) -> String {
        let mut out = String::new();
        for seg in self.path.iter().rev() {
            match seg {
                Segment::Key(k) => out = key_path(&out, k),
                Segment::Index(i) => out = index_path(&out, *i),
            }
        }
        out
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            pos: None,
            path: Vec::new(),
        }
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!(
            "expected {}, found {}",
            describe_expected(exp),
            describe_unexpected(&unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!(
            "invalid value {}: expected {}",
            describe_unexpected(&unexp),
            describe_expected(exp)
        ))
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        Self::custom(format_args!(
            "expected {}, found {len} items",
            describe_expected(exp)
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format_args!(
            "unknown value {variant:?} (expected one of: {})",
            expected.join(", ")
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        if expected.is_empty() {
            Self::custom(format_args!(
                "unknown key {field:?} (no keys are allowed here)"
            ))
        } else {
            Self::custom(format_args!(
                "unknown key {field:?} (expected one of: {})",
                expected.join(", ")
            ))
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self::custom(format_args!("missing required key {field:?}"))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::custom(format_args!("duplicate key {field:?}"))
    }
}

/// serde names what it wanted in Rust terms (`u16`, `struct HealthConfig`); say it in
/// the file's terms.
fn describe_expected(exp: &dyn Expected) -> String {
    let s = exp.to_string();
    match s.as_str() {
        "u8" => "an integer from 0 to 255".to_string(),
        "u16" => "an integer from 0 to 65535".to_string(),
        "u32" => "an integer from 0 to 4294967295".to_string(),
        "u64" | "usize" | "u128" => "a non-negative integer".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" | "i128" => "an integer".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a mapping".to_string(),
        "socket address" => "an address ip:port".to_string(),
        "IP address" => "an IP address".to_string(),
        _ if s.starts_with("struct ") => "a mapping".to_string(),
        _ if s.starts_with("a ") || s.starts_with("an ") => s,
        _ if s.starts_with(['a', 'e', 'i', 'o', 'u']) => format!("an {s}"),
        _ => format!("a {s}"),
    }
}

fn describe_unexpected(u: &Unexpected<'_>) -> String {
    match u {
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(x) => x.to_string(),
        Unexpected::Char(c) => format!("{:?}", c.to_string()),
        Unexpected::Str(s) => format!("{s:?}"),
        Unexpected::Unit | Unexpected::Option => "an empty value".to_string(),
        Unexpected::Seq => "a list".to_string(),
        Unexpected::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

fn unexpected_of(node: &Node) -> Unexpected<'_> {
    match &node.kind {
        Kind::Scalar(s) if s.plain && is_null_text(&s.text) => Unexpected::Unit,
        Kind::Scalar(s) => Unexpected::Str(&s.text),
        Kind::Seq(_) => Unexpected::Seq,
        Kind::Map(_) => Unexpected::Map,
    }
}

/// The text of a non-null scalar, else the "expected X, found Y" error.
fn scalar_text<'n>(node: &'n Node, exp: &dyn Expected) -> Result<&'n str, DeError> {
    match &node.kind {
        Kind::Scalar(s) if !(s.plain && is_null_text(&s.text)) => Ok(&s.text),
        _ => Err(de::Error::invalid_type(unexpected_of(node), exp)),
    }
}

enum Int {
    Unsigned(u64),
    Signed(i64),
}

/// Integers as the YAML 1.2 core schema writes them: decimal, `0x..`, `0o..`.
fn parse_int(text: &str) -> Option<Int> {
    let t = text.trim();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let magnitude = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = digits.strip_prefix("0o") {
        u64::from_str_radix(oct, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    if negative {
        let n = i64::try_from(magnitude).ok()?;
        Some(Int::Signed(-n))
    } else {
        Some(Int::Unsigned(magnitude))
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_float(text: &str) -> Option<f64> {
    let t = text.trim();
    match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
        // Rust also reads "inf" and "nan", which YAML does not treat as numbers.
        _ if t.bytes().any(|b| b.is_ascii_digit())
            && t.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            t.parse().ok()
        }
        _ => None,
    }
}

struct NodeDe<'n>(&'n Node);

impl<'n> NodeDe<'n> {
    fn integer<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = scalar_text(self.0, &visitor)?;
        match parse_int(text) {
            Some(Int::Unsigned(n)) => visitor.visit_u64(n),
            Some(Int::Signed(n)) => visitor.visit_i64(n),
            None => Err(de::Error::invalid_type(Unexpected::Str(text), &visitor)),
        }
    }

    fn float<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = scalar_text(self.0, &visitor)?;
        match parse_float(text) {
            Some(x) => visitor.visit_f64(x),
            None => Err(de::Error::invalid_type(Unexpected::Str(text), &visitor)),
        }
    }
}

macro_rules! integer_methods {
    ($($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.integer(visitor)
        })*
    };
}

impl<'de, 'n> de::Deserializer<'de> for NodeDe<'n> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Scalar(s) if s.plain => {
                if is_null_text(&s.text) {
                    visitor.visit_unit()
                } else if let Some(b) = parse_bool(&s.text) {
                    visitor.visit_bool(b)
                } else if let Some(n) = parse_int(&s.text) {
                    match n {
                        Int::Unsigned(n) => visitor.visit_u64(n),
                        Int::Signed(n) => visitor.visit_i64(n),
                    }
                } else if let Some(x) = parse_float(&s.text) {
                    visitor.visit_f64(x)
                } else {
                    visitor.visit_str(&s.text)
                }
            }
            Kind::Scalar(s) => visitor.visit_str(&s.text),
            Kind::Seq(items) => visitor.visit_seq(SeqDe::new(items)),
            Kind::Map(entries) => visitor.visit_map(MapDe::new(entries)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = scalar_text(self.0, &visitor)?;
        match parse_bool(text) {
            Some(b) => visitor.visit_bool(b),
            None => Err(de::Error::invalid_type(Unexpected::Str(text), &visitor)),
        }
    }

    integer_methods!(deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.float(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.float(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = scalar_text(self.0, &visitor)?;
        visitor.visit_str(text)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.0.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.0.is_null() {
            visitor.visit_unit()
        } else {
            Err(de::Error::invalid_type(unexpected_of(self.0), &visitor))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Seq(items) => visitor.visit_seq(SeqDe::new(items)),
            // `backup:` with nothing after it reads as an empty list.
            _ if self.0.is_null() => visitor.visit_seq(SeqDe::new(&[])),
            _ => Err(de::Error::invalid_type(unexpected_of(self.0), &visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Map(entries) => visitor.visit_map(MapDe::new(entries)),
            // `health:` with nothing after it means "all defaults".
            _ if self.0.is_null() => visitor.visit_map(MapDe::new(&[])),
            _ => Err(de::Error::invalid_type(unexpected_of(self.0), &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Scalar(s) if !self.0.is_null() => visitor.visit_enum(UnitVariant(&s.text)),
            _ => Err(de::Error::custom(format_args!(
                "expected one of: {}, found {}",
                variants.join(", "),
                describe_unexpected(&unexpected_of(self.0))
            ))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// The file only has unit variants (`protocol: udp`), written as a bare string.
struct UnitVariant<'n>(&'n str);

impl<'de, 'n> EnumAccess<'de> for UnitVariant<'n> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), DeError> {
        let de: de::value::StrDeserializer<'_, DeError> = self.0.into_deserializer();
        Ok((seed.deserialize(de)?, self))
    }
}

impl<'de, 'n> de::VariantAccess<'de> for UnitVariant<'n> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _seed: S) -> Result<S::Value, DeError> {
        Err(de::Error::custom(format_args!(
            "{:?} needs a value",
            self.0
        )))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom(format_args!("{:?} needs a list", self.0)))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom(format_args!(
            "{:?} needs a mapping",
            self.0
        )))
    }
}

struct SeqDe<'n> {
    items: std::slice::Iter<'n, Node>,
    index: usize,
}

impl<'n> SeqDe<'n> {
    fn new(items: &'n [Node]) -> Self {
        SeqDe {
            items: items.iter(),
            index: 0,
        }
    }
}

impl<'de, 'n> SeqAccess<'de> for SeqDe<'n> {
    type Error = DeError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(NodeDe(item))
            .map(Some)
            .map_err(|e| e.locate(item).within(Segment::Index(index)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'n> {
    entries: std::slice::Iter<'n, Entry>,
    current: Option<&'n Entry>,
}

impl<'n> MapDe<'n> {
    fn new(entries: &'n [Entry]) -> Self {
        MapDe {
            entries: entries.iter(),
            current: None,
        }
    }
}

impl<'de, 'n> MapAccess<'de> for MapDe<'n> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.current = Some(entry);
        let de: de::value::StrDeserializer<'_, DeError> = entry.key.as_str().into_deserializer();
        seed.deserialize(de).map(Some).map_err(|mut e| {
            // A bad key (unknown, misspelt) is reported where the key is written.
            if e.pos.is_none() {
                e.pos = Some(entry.key_pos);
            }
            e.within(Segment::Key(entry.key.clone()))
        })
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let entry = self
            .current
            .take()
            .ok_or_else(|| <DeError as de::Error>::custom("value asked for before its key"))?;
        seed.deserialize(NodeDe(&entry.value)).map_err(|e| {
            e.locate(&entry.value)
                .within(Segment::Key(entry.key.clone()))
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".to_string()),
            "EMPTY" => Some(String::new()),
            "INJECT" => Some("x\nkey: [1, 2]".to_string()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_escapes() {
        assert_eq!(expand_str("plain", &env), Ok(None));
        assert_eq!(expand_str("${A}", &env), Ok(Some("alpha".into())));
        assert_eq!(
            expand_str("x-${A}-${A}", &env),
            Ok(Some("x-alpha-alpha".into()))
        );
        assert_eq!(expand_str("$${A}", &env), Ok(Some("${A}".into())));
        assert_eq!(expand_str("cost $5", &env), Ok(None));
        assert_eq!(expand_str("${EMPTY}", &env), Ok(Some(String::new())));
    }

    #[test]
    fn reports_every_missing_or_bad_variable() {
        assert_eq!(
            expand_str("${NOPE}:${ALSO_NOPE}", &env),
            Err(vec![
                "environment variable NOPE is not set".to_string(),
                "environment variable ALSO_NOPE is not set".to_string(),
            ])
        );
        assert_eq!(
            expand_str("${1X}", &env),
            Err(vec![
                "invalid environment variable name \"1X\" in \"${1X}\" (write $${ for a literal ${)"
                    .to_string()
            ])
        );
        assert_eq!(
            expand_str("${A", &env),
            Err(vec!["unterminated ${...} in \"${A\"".to_string()])
        );
    }

    #[test]
    fn expanded_value_stays_one_string() {
        let mut root = parse("a: ${INJECT}\nb: ${EMPTY}\n").unwrap().unwrap();
        let mut errors = Vec::new();
        expand_env(&mut root, "", &env, &mut errors);
        assert!(errors.is_empty());
        let Kind::Map(entries) = &root.kind else {
            panic!("root is not a mapping")
        };
        assert_eq!(entries.len(), 2);
        let Kind::Scalar(a) = &entries[0].value.kind else {
            panic!("a is not a scalar")
        };
        assert_eq!(a.text, "x\nkey: [1, 2]");
        // An empty variable is an empty string, never null.
        assert!(!entries[1].value.is_null());
    }

    #[test]
    fn keys_are_not_expanded() {
        let mut root = parse("${A}: 1\n").unwrap().unwrap();
        let mut errors = Vec::new();
        expand_env(&mut root, "", &env, &mut errors);
        let Kind::Map(entries) = &root.kind else {
            panic!("root is not a mapping")
        };
        assert_eq!(entries[0].key, "${A}");
    }

    #[test]
    fn aliases_copy_their_anchor_and_are_bounded() {
        let root = parse("a: &x [1, 2]\nb: *x\n").unwrap().unwrap();
        let positions = root.positions();
        assert_eq!(
            positions.get("b[1]"),
            Some(&Pos {
                line: 1,
                column: 11
            })
        );
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("too large"), "{err:?}");
    }

    #[test]
    fn empty_documents_are_none() {
        for text in ["", "# only a comment\n", "---\n", "~\n", "---\n...\n"] {
            assert!(parse(text).unwrap().is_none(), "{text:?}");
        }
    }
}
