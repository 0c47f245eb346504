//! Keeps the module graph one-way: reads every import of `src/` (`use` trees and inline
//! `crate::`/`super::` paths, test modules included) and fails when
//!
//! - a top-level module imports from a module on its own layer or a layer above it, by the
//!   layer table in `ARCHITECTURE.md` (the block under "The layers"), or
//! - the files of one module import each other in a circle (more than the few that
//!   `ARCHITECTURE.md` lists under "Allowed circles").
//!
//! Every failure names the file, the line, the import and the rule it breaks. A module of
//! `src/` that the table does not list fails too, so a new module must be given a floor.
//!
//! Plain string work, no parser crate: comments, strings and character literals are
//! blanked out first, then paths are read from what is left. A `pub use` in a module's
//! `mod.rs` is followed to the file that defines the item, so a re-export hides no circle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One import: the module path it names, where it was written, and what it read.
#[derive(Debug, Clone)]
struct Import {
    path: Vec<String>,
    line: usize,
    text: String,
}

/// One source file of the library.
#[derive(Debug)]
struct File {
    rel: String,
    /// The module this file is (`["proxy", "udp", "table"]`).
    module: Vec<String>,
    imports: Vec<Import>,
    /// `pub use` re-exports: item name → the path it re-exports.
    reexports: HashMap<String, Vec<String>>,
}

/// Blanks comments, string literals and character literals (keeping newlines), so only
/// code is left.
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or('\0');
        if c == '/' && next == '/' {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == '*' {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == '"' || next == '#')
            && (i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_'))
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\''), or a lifetime ('a), left as it is.
            if next == '\\' {
                let mut j = i + 2;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                for _ in i..=j.min(b.len() - 1) {
                    out.push(' ');
                }
                i = j + 1;
            } else if b.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`a::{b, c::{d, e as f}, self}`) into paths; the alias, if any,
/// comes with each.
fn expand_tree(tree: &str) -> Vec<(Vec<String>, Option<String>)> {
    fn split_top(s: &str) -> Vec<String> {
        let mut parts = Vec::new();
        let mut depth = 0;
        let mut cur = String::new();
        for c in s.chars() {
            match c {
                '{' => {
                    depth += 1;
                    cur.push(c)
                }
                '}' => {
                    depth -= 1;
                    cur.push(c)
                }
                ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        parts.push(cur);
        parts
            .into_iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix: Vec<String> = tree[..open]
            .trim_end_matches("::")
            .split("::")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut out = Vec::new();
        for part in split_top(inner) {
            for (mut p, alias) in expand_tree(&part) {
                if p.first().map(String::as_str) == Some("self") {
                    p.remove(0);
                }
                let mut full = prefix.clone();
                full.extend(p);
                out.push((full, alias));
            }
        }
        out
    } else {
        let (path, alias) = match tree.split_once(" as ") {
            Some((p, a)) => (p, Some(a.trim().to_string())),
            None => (tree, None),
        };
        vec![(
            path.split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            alias,
        )]
    }
}

/// The module a `crate::`/`super::`/`self::` path starts from, or None for an external
/// crate or a child module named without a prefix.
fn absolute(path: &[String], here: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "super" | "self" => {
            let mut base = here.to_vec();
            let mut rest = path;
            while let Some(seg) = rest.first() {
                match seg.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        _ => None,
    }
}

/// Reads one file: its imports and re-exports.
fn read_file(rel: &str, module: Vec<String>, src: &str) -> File {
    let code = strip(src);
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    let mut imports = Vec::new();
    let mut reexports = HashMap::new();
    // Inline modules (`mod tests { ... }`): (name, brace depth at which it closes).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut in_use_until = 0usize;
    let mut k = 0;
    while k < chars.len() {
        let (pos, c) = chars[k];
        if c == '{' {
            depth += 1;
            k += 1;
            continue;
        }
        if c == '}' {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            k += 1;
            continue;
        }
        if !is_ident(c) || (k > 0 && is_ident(chars[k - 1].1)) {
            k += 1;
            continue;
        }
        let word_end = code[pos..]
            .find(|ch: char| !is_ident(ch))
            .map_or(code.len(), |e| pos + e);
        let word = &code[pos..word_end];
        let here: Vec<String> = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect();
        if word == "mod" {
            let rest = &code[word_end..];
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                inline.push((name, depth));
            }
        } else if word == "use" && pos >= in_use_until {
            let end = code[word_end..]
                .find(';')
                .map_or(code.len(), |e| word_end + e);
            let tree = &code[word_end..end];
            for (path, alias) in expand_tree(tree) {
                let Some(abs) = absolute(&path, &here) else {
                    continue;
                };
                // Every use at file level names something for the file's children too
                // (`super::x` from a child reaches a private `use` of its parent).
                if inline.is_empty() {
                    let name = alias.clone().or_else(|| abs.last().cloned());
                    if let Some(name) = name.filter(|n| n != "*") {
                        reexports.insert(name, abs.clone());
                    }
                }
                imports.push(Import {
                    path: abs.into_iter().filter(|s| s != "*").collect(),
                    line: line_of(pos),
                    text: format!(
                        "use {}",
                        tree.split_whitespace().collect::<Vec<_>>().join(" ")
                    ),
                });
            }
            in_use_until = end;
        } else if (word == "crate" || word == "super")
            && pos >= in_use_until
            && code[word_end..].starts_with("::")
        {
            // An inline path: crate::a::b::C or super::super::x.
            let mut end = word_end;
            while code[end..].starts_with("::") {
                let seg_end = code[end + 2..]
                    .find(|ch: char| !is_ident(ch))
                    .map_or(code.len(), |e| end + 2 + e);
                if seg_end == end + 2 {
                    break;
                }
                end = seg_end;
            }
            let text = &code[pos..end];
            let path: Vec<String> = text.split("::").map(str::to_string).collect();
            if let Some(abs) = absolute(&path, &here) {
                imports.push(Import {
                    path: abs,
                    line: line_of(pos),
                    text: text.to_string(),
                });
            }
            while k < chars.len() && chars[k].0 < end {
                k += 1;
            }
            continue;
        }
        while k < chars.len() && chars[k].0 < word_end {
            k += 1;
        }
    }
    File {
        rel: rel.to_string(),
        module,
        imports,
        reexports,
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every file of the library (`src/bin` and `src/main.rs` are programs that use it).
fn library() -> Vec<File> {
    let src = Path::new(ROOT).join("src");
    let mut paths = Vec::new();
    walk(&src, &mut paths);
    let mut files = Vec::new();
    for p in paths {
        let rel = p.strip_prefix(&src).expect("under src");
        let rel_s = rel.to_string_lossy().to_string();
        if rel_s.starts_with("bin/") || rel_s == "main.rs" || rel_s == "lib.rs" {
            continue;
        }
        let mut module: Vec<String> = rel_s
            .trim_end_matches(".rs")
            .split('/')
            .map(str::to_string)
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        let text = std::fs::read_to_string(&p).expect("read source");
        files.push(read_file(&format!("src/{rel_s}"), module, &text));
    }
    files
}

/// The file an import lands in: the longest prefix of its path that is a file, following
/// re-exports of that file (a few hops).
fn resolve(path: &[String], files: &BTreeMap<Vec<String>, usize>, all: &[File]) -> Option<usize> {
    let mut path = path.to_vec();
    for _ in 0..4 {
        let (len, idx) = (1..=path.len())
            .rev()
            .find_map(|n| files.get(&path[..n]).map(|&i| (n, i)))?;
        let Some(item) = path.get(len) else {
            return Some(idx);
        };
        match all[idx].reexports.get(item) {
            Some(target) if target.len() > len || target[..len] != path[..len] => {
                let mut next = target.clone();
                next.extend(path[len + 1..].iter().cloned());
                path = next;
            }
            _ => return Some(idx),
        }
    }
    None
}

/// The layer table: module → (floor, floor name), read from ARCHITECTURE.md.
fn layers() -> BTreeMap<String, (usize, String)> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the repository root");
    let block = doc
        .split("<!-- layers -->")
        .nth(1)
        .expect("ARCHITECTURE.md has a `<!-- layers -->` marker before the layer table");
    let block = block
        .split("```")
        .nth(1)
        .expect("a fenced block follows the marker");
    let mut out = BTreeMap::new();
    for line in block.lines().skip(1) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (head, mods) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("layer line {line:?}: `N name: module module ...`"));
        let mut head = head.split_whitespace();
        let floor: usize = head
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("layer line {line:?} starts with its floor number"));
        let name = head.collect::<Vec<_>>().join(" ");
        for m in mods.split_whitespace() {
            let prev = out.insert(m.to_string(), (floor, name.clone()));
            assert!(prev.is_none(), "`{m}` is on two floors of ARCHITECTURE.md");
        }
    }
    out
}

/// Circles of a directed graph (strongly connected components of more than one node).
fn circles(nodes: &BTreeSet<usize>, edges: &BTreeMap<usize, BTreeSet<usize>>) -> Vec<Vec<usize>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<usize, BTreeSet<usize>>,
        index: HashMap<usize, usize>,
        low: HashMap<usize, usize>,
        stack: Vec<usize>,
        on: BTreeSet<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for &w in self.edges.get(&v).into_iter().flatten() {
                if !self.index.contains_key(&w) {
                    self.visit(w);
                    let l = self.low[&v].min(self.low[&w]);
                    self.low.insert(v, l);
                } else if self.on.contains(&w) {
                    let l = self.low[&v].min(self.index[&w]);
                    self.low.insert(v, l);
                }
            }
            if self.low[&v] == self.index[&v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(&w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for &n in nodes {
        if !t.index.contains_key(&n) {
            t.visit(n);
        }
    }
    t.out
}

/// The circles ARCHITECTURE.md allows: each a line of file paths under "Allowed circles".
fn allowed_circles() -> Vec<BTreeSet<String>> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let Some(block) = doc.split("<!-- allowed circles -->").nth(1) else {
        return Vec::new();
    };
    let block = block.split("```").nth(1).unwrap_or("");
    block
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Every import of `files` that breaks the layer table, and every module without a floor.
fn layering_errors(files: &[File], layers: &BTreeMap<String, (usize, String)>) -> Vec<String> {
    let mut errors = Vec::new();
    let tops: BTreeSet<&String> = files.iter().filter_map(|f| f.module.first()).collect();
    for t in &tops {
        if !layers.contains_key(*t) {
            errors.push(format!(
                "src/{t}: module `{t}` has no floor in ARCHITECTURE.md's layer table"
            ));
        }
    }
    for m in layers.keys() {
        if !tops.contains(m) {
            errors.push(format!(
                "ARCHITECTURE.md: `{m}` is in the layer table but not a module of src/"
            ));
        }
    }
    for f in files {
        let from = &f.module[0];
        let Some((from_floor, from_name)) = layers.get(from) else {
            continue;
        };
        for imp in &f.imports {
            let Some(to) = imp.path.first() else { continue };
            if to == from {
                continue;
            }
            let Some((to_floor, to_name)) = layers.get(to) else {
                errors.push(format!(
                    "{}:{}: `{}` names `{to}`, which is not a module of the layer table",
                    f.rel, imp.line, imp.text
                ));
                continue;
            };
            if to_floor >= from_floor {
                let how = if to_floor == from_floor {
                    "on its own floor"
                } else {
                    "above it"
                };
                errors.push(format!(
                    "{}:{}: `{from}` (floor {from_floor}, {from_name}) imports `{to}` (floor \
                     {to_floor}, {to_name}), {how}: `{}`; a module imports only from layers below \
                     it, and a lower layer that needs something from above takes it as a value, a \
                     trait or a callback (ARCHITECTURE.md)",
                    f.rel, imp.line, imp.text
                ));
            }
        }
    }
    errors
}

#[test]
fn every_import_points_down_a_layer() {
    let errors = layering_errors(&library(), &layers());
    assert!(
        errors.is_empty(),
        "{} import(s) break the layering:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn an_import_up_or_sideways_is_reported_with_file_and_line() {
    let layers: BTreeMap<String, (usize, String)> = [
        ("config", 1, "configuration"),
        ("metrics", 2, "observability"),
        ("logging", 2, "observability"),
        ("app", 8, "wiring"),
    ]
    .into_iter()
    .map(|(m, f, n)| (m.to_string(), (f, n.to_string())))
    .collect();
    let files = vec![
        read_file(
            "src/config/mod.rs",
            vec!["config".into()],
            "pub struct Config;\n",
        ),
        read_file(
            "src/logging.rs",
            vec!["logging".into()],
            "use crate::config::Config;\n",
        ),
        read_file(
            "src/metrics.rs",
            vec!["metrics".into()],
            "use crate::config::Config;\nfn f() { crate::logging::init(); }\nuse crate::app::App;\n",
        ),
        read_file(
            "src/app.rs",
            vec!["app".into()],
            "use crate::metrics::Metrics;\n",
        ),
    ];
    let errors = layering_errors(&files, &layers);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with("src/metrics.rs:2: `metrics` (floor 2"),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("on its own floor"), "{}", errors[0]);
    assert!(
        errors[1].starts_with("src/metrics.rs:3: `metrics`"),
        "{}",
        errors[1]
    );
    assert!(
        errors[1].contains("`app` (floor 8, wiring), above it"),
        "{}",
        errors[1]
    );
    assert!(
        errors[1].contains("imports only from layers below"),
        "{}",
        errors[1]
    );
}

#[test]
fn the_files_of_a_module_import_each_other_one_way() {
    let files = library();
    let by_module: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut nodes = BTreeSet::new();
    for (i, f) in files.iter().enumerate() {
        nodes.insert(i);
        for imp in &f.imports {
            let Some(j) = resolve(&imp.path, &by_module, &files) else {
                continue;
            };
            let to = &files[j].module;
            // Inside one top-level module only (across modules the layers rule), and not a
            // parent that declares and re-exports its own children.
            if j == i || to.first() != f.module.first() || to.starts_with(&f.module) {
                continue;
            }
            edges.entry(i).or_default().insert(j);
        }
    }
    let allowed = allowed_circles();
    let mut errors = Vec::new();
    for c in circles(&nodes, &edges) {
        let names: BTreeSet<String> = c.iter().map(|&i| files[i].rel.clone()).collect();
        if allowed.contains(&names) {
            continue;
        }
        let mut why = Vec::new();
        for &a in &c {
            for imp in &files[a].imports {
                if let Some(b) = resolve(&imp.path, &by_module, &files)
                    && b != a
                    && c.contains(&b)
                    && edges.get(&a).is_some_and(|e| e.contains(&b))
                {
                    why.push(format!(
                        "  {}:{}: `{}` -> {}",
                        files[a].rel, imp.line, imp.text, files[b].rel
                    ));
                }
            }
        }
        why.dedup();
        errors.push(format!(
            "files import each other in a circle: {}\n{}",
            names.into_iter().collect::<Vec<_>>().join(" "),
            why.join("\n")
        ));
    }
    assert!(
        errors.is_empty(),
        "{} circle(s) inside modules (the files of a module import one way; ARCHITECTURE.md \
         lists the few allowed):\n{}",
        errors.len(),
        errors.join("\n\n")
    );
}

#[test]
fn the_reader_sees_use_trees_inline_paths_and_test_modules() {
    let src = "use crate::{config::{A, B as C}, metrics};\n\
               use super::x::Y;\n\
               // use crate::ignored;\n\
               const S: &str = \"crate::ignored\";\n\
               fn f() { crate::offload::refresh(); let c = '\"'; }\n\
               mod tests { use super::*; }\n";
    let f = read_file("src/a/b.rs", vec!["a".into(), "b".into()], src);
    let got: Vec<(String, usize)> = f
        .imports
        .iter()
        .map(|i| (i.path.join("::"), i.line))
        .collect();
    assert_eq!(
        got,
        vec![
            ("config::A".to_string(), 1),
            ("config::B".to_string(), 1),
            ("metrics".to_string(), 1),
            ("a::x::Y".to_string(), 2),
            ("offload::refresh".to_string(), 5),
            ("a::b".to_string(), 6),
        ]
    );
}

#[test]
fn lib_rs_shows_the_layer_table_of_architecture_md() {
    let table = |text: &str| -> Vec<String> {
        let block = text.split("```text").nth(1).unwrap_or("");
        let block = block.split("```").next().unwrap_or("");
        block
            .lines()
            .map(|l| l.trim_start_matches("//!").trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let lib = std::fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).unwrap();
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let arch = doc.split("<!-- layers -->").nth(1).unwrap_or("");
    let (lib_table, arch_table) = (table(&lib), table(arch));
    assert!(!arch_table.is_empty(), "ARCHITECTURE.md has no layer table");
    assert_eq!(
        lib_table, arch_table,
        "src/lib.rs's doc comment must show the layer table of ARCHITECTURE.md"
    );
}
