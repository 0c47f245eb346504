//! Reading a configuration file: YAML with positions, `${VAR}` expansion, deserialization
//! into [`Config`], then the semantic checks of [`super::validate`]. Every problem comes
//! out as a [`ConfigError`] naming the file, line, column and key path, and every stage
//! runs even when an earlier one failed, so one `mediagate check` lists them all.

use super::types::Config;
use super::validate::validate;
use super::yaml::{self, Located, Pos};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// One configuration problem, printed as `file:line:col: key.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it (or the label given to [`load_str`]).
    pub file: String,
    /// 1-based; `None` only when the problem has no place in the text (unreadable file).
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// Key path such as `upstreams.janus-rtp.health.interval` or `listeners[1].listen`
    /// (list indexes count from 0); empty for the file as a whole.
    pub path: String,
    /// What is wrong, in words; never a `Debug` dump.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one file, ordered by position; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads, expands, parses and validates a configuration file; `${VAR}` comes from the
/// process environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: label.clone(),
            line: None,
            column: None,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(&text, &label)
}

/// Parses and validates configuration text; `file` labels the errors, `${VAR}` comes
/// from the process environment.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, file, &|name| std::env::var(name).ok())
}

/// As [`load_str`], with `env` answering `${VAR}` lookups (tests, or a caller with its
/// own variables). A variable for which `env` returns `None` is an error.
pub fn load_str_with_env(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let fail = |errors: Vec<Located>| ConfigErrors(to_config_errors(file, errors));
    let Some(mut root) = yaml::parse(text).map_err(|e| fail(vec![e]))? else {
        return Err(fail(vec![Located {
            pos: Some(Pos { line: 1, column: 1 }),
            path: String::new(),
            message: "the configuration file is empty".to_string(),
        }]));
    };
    let mut errors = Vec::new();
    yaml::expand_env(&mut root, "", env, &mut errors);
    // Every stage runs, so that one `check` reports every problem of the file: a value
    // that failed an earlier stage counts as unset in the later ones, and what those
    // report about it (or about a value inside it) is left out as a consequence.
    // Paths (as written in the file) that already carry an error.
    let mut bad: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
    // List items taken out so far, to translate paths back to the file's indexes.
    let mut removed_items: Vec<String> = Vec::new();
    let mut config = None;
    // serde stops at the first problem: take the offending value out and go again.
    for _ in 0..MAX_DESERIALIZE_ROUNDS {
        match yaml::from_node::<Config>(&root) {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(e) => {
                let path = as_written(&removed_items, &e.path);
                let removable = !e.path.is_empty() && remove(&mut root, "", &e.path);
                if removable && e.path.ends_with(']') {
                    removed_items.push(e.path.clone());
                }
                if !bad.iter().any(|b| related(b, &path)) {
                    errors.push(Located {
                        pos: e.pos,
                        path: path.clone(),
                        message: e.message,
                    });
                }
                bad.push(path);
                if !removable {
                    break;
                }
            }
        }
    }
    let Some(mut config) = config else {
        return Err(fail(errors));
    };

    let positions = root.positions();
    let (mut issues, shadowed) = super::secret_files::resolve(&mut config);
    bad.extend(shadowed.iter().map(|p| p.to_string()));
    issues.extend(validate(&config));
    let written = |p: &str| positions.contains_key(p);
    issues.extend(super::advice::meaningless_keys(&config, &written));
    for issue in issues {
        let pos = position_of(&positions, &issue.path);
        let path = as_written(&removed_items, &issue.path);
        if !bad.iter().any(|b| related(b, &path)) {
            errors.push(Located {
                pos,
                path,
                message: issue.message,
            });
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(fail(errors))
    }
}

/// Bound on the deserialize-and-remove rounds (each removes one value of the file).
const MAX_DESERIALIZE_ROUNDS: usize = 100;

/// A path of the tree after the list items in `removed` (oldest first) were taken out,
/// as it reads in the file: `a[2]` after `a[1]` was removed is `a[3]`.
fn as_written(removed: &[String], path: &str) -> String {
    let mut path = path.to_string();
    for item in removed.iter().rev() {
        let Some(open) = item.rfind('[') else {
            continue;
        };
        let (list, index) = (&item[..open], &item[open + 1..item.len() - 1]);
        let Ok(i) = index.parse::<usize>() else {
            continue;
        };
        let Some(rest) = path.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else {
            continue;
        };
        let Some((j, tail)) = rest.split_once(']') else {
            continue;
        };
        match j.parse::<usize>() {
            Ok(j) if j >= i => path = format!("{list}[{}]{tail}", j + 1),
            _ => {}
        }
    }
    path
}

/// Whether one key path is the other or inside it (`a.b` and `a.b.c`, `a[0]` and `a[0].b`).
fn related(a: &str, b: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        inner.len() > outer.len()
            && inner.starts_with(outer)
            && matches!(inner.as_bytes()[outer.len()], b'.' | b'[')
    };
    a == b || inside(a, b) || inside(b, a)
}

/// Removes the value at `target` (a key path as [`yaml::Node::positions`] writes them)
/// from the tree under `node` (at `path`); false when there is none.
fn remove(node: &mut yaml::Node, path: &str, target: &str) -> bool {
    match &mut node.kind {
        yaml::Kind::Scalar(_) => false,
        yaml::Kind::Seq(items) => {
            for i in 0..items.len() {
                let p = yaml::index_path(path, i);
                if p == target {
                    items.remove(i);
                    return true;
                }
                if related(&p, target) && remove(&mut items[i], &p, target) {
                    return true;
                }
            }
            false
        }
        yaml::Kind::Map(entries) => {
            for i in 0..entries.len() {
                let p = yaml::key_path(path, &entries[i].key);
                if p == target {
                    entries.remove(i);
                    return true;
                }
                if related(&p, target) && remove(&mut entries[i].value, &p, target) {
                    return true;
                }
            }
            false
        }
    }
}

/// Position of a key path, or of its nearest written ancestor: a problem with a default
/// value (say the default `timeout` against a short `interval`) points at the block that
/// would hold it.
fn position_of(positions: &HashMap<String, Pos>, path: &str) -> Option<Pos> {
    let mut p = path;
    loop {
        if let Some(pos) = positions.get(p) {
            return Some(*pos);
        }
        match p.rfind(['.', '[']) {
            Some(i) => p = &p[..i],
            None => return positions.get("").copied(),
        }
    }
}

fn to_config_errors(file: &str, mut errors: Vec<Located>) -> Vec<ConfigError> {
    // Sorting is stable, so problems on one spot keep the order the checks found them in.
    errors.sort_by_key(|e| {
        e.pos
            .map_or((usize::MAX, usize::MAX), |p| (p.line, p.column))
    });
    errors
        .into_iter()
        .map(|e| ConfigError {
            file: file.to_string(),
            line: e.pos.map(|p| p.line),
            column: e.pos.map(|p| p.column),
            path: e.path,
            message: e.message,
        })
        .collect()
}
