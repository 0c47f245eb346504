//! A serde `Deserializer` over the positioned tree: every error leaves tagged with the key
//! path and the position of the innermost node that saw it.

use super::{Entry, Kind, Located, Node, Pos, index_path, is_null_text, key_path};
use serde::de::{
    self, DeserializeSeed, EnumAccess, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use std::fmt;

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
        // The documented spelling only: a kebab-case alias (`round-robin`) of a listed
        // snake_case name (`round_robin`) is accepted but not offered.
        let documented: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|e| !(e.contains('-') && expected.contains(&e.replace('-', "_").as_str())))
            .collect();
        Self::custom(format_args!(
            "unknown value {variant:?} (expected one of: {})",
            documented.join(", ")
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
