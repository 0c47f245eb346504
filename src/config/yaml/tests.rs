//! Tests of the positioned YAML tree, `${VAR}` expansion and the deserializer.
use super::env::*;
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
