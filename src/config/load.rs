//! Reading a configuration file: YAML with positions, `${VAR}` expansion, deserialization
//! into [`Config`], then the semantic checks of [`super::validate`]. Every problem comes
//! out as a [`ConfigError`] naming the file, line, column and key path.

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
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    // serde stops at the first problem, so this yields at most one error.
    let config: Config = yaml::from_node(&root).map_err(|e| fail(vec![e]))?;

    let positions = root.positions();
    let issues = validate(&config);
    if issues.is_empty() {
        return Ok(config);
    }
    let located = issues
        .into_iter()
        .map(|issue| Located {
            pos: position_of(&positions, &issue.path),
            path: issue.path,
            message: issue.message,
        })
        .collect();
    Err(fail(located))
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
