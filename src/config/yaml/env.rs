//! `${VAR}` expansion on a parsed tree: variables only ever become (part of) one string.

use super::{Kind, Located, Node, index_path, key_path};

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
pub(super) fn expand_str(
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
