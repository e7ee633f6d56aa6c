//! The crate's dependency direction, checked from the source text.
//!
//! Every `crate::module` path in `src/` (outside `#[cfg(test)]` blocks,
//! `#![cfg(test)]` files and comments) is an edge from the file's top-level module to `module`. Leaf
//! modules (addresses, names, the clock, replies, hop counting, the metrics
//! recorder, slots) have no edges; the graph of the other modules has no
//! cycle; only the composition root (`lib.rs`/`node.rs`) and `main.rs` may
//! know everything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LEAVES: &[&str] = &[
    "addr",
    "names",
    "clock",
    "reply",
    "hops",
    "telemetry",
    "slots",
    "netkeys",
    "dnslist",
];
const ROOTS: &[&str] = &["lib", "main", "node"];

/// The source text without comments and without `#[cfg(test)]` items.
fn production_text(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim();
        if skip_depth.is_none() && trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        let opens = code.matches('{').count() as i32;
        let closes = code.matches('}').count() as i32;
        if pending_cfg_test {
            pending_cfg_test = false;
            if opens > closes {
                skip_depth = Some(depth);
                depth += opens - closes;
                continue;
            }
            // A one-line item (`mod testutil;`, `use ...;`): skip it.
            if trimmed.ends_with(';') {
                continue;
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Top-level modules named after `crate::` in `text` (groups included).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `magicmx_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b}`: first-level names, commas at depth 0.
            for part in split_top(group) {
                let name = ident(part.trim());
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// The comma-separated items of a `{...}` group at depth 0.
fn split_top(group: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                parts.push(&group[start..i]);
                return parts;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts
}

/// Every file under `src/`, at any depth.
fn src_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            match path.is_dir() {
                true => stack.push(path),
                false => files.push(path),
            }
        }
    }
    files
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in src_files() {
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        // A file that is test code as a whole (`#![cfg(test)]`, e.g. a
        // module of test helpers) has no production edges.
        if text.lines().any(|l| l.trim() == "#![cfg(test)]") {
            continue;
        }
        let refs = crate_refs(&production_text(&text));
        let out = edges.entry(module.clone()).or_default();
        out.extend(refs.into_iter().filter(|r| *r != module));
    }
    edges
}

#[test]
fn leaf_modules_import_nothing_from_the_crate() {
    let g = graph();
    for leaf in LEAVES {
        let deps = g.get(*leaf).unwrap_or_else(|| panic!("no module {leaf}"));
        assert!(deps.is_empty(), "leaf module {leaf} imports {deps:?}");
    }
}

#[test]
fn modules_form_no_cycle() {
    let g = graph();
    // Depth-first search for a back edge, roots excluded (they may know all).
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("module cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if !ROOTS.contains(&d.as_str()) {
                visit(d, g, path, done);
            }
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in g.keys().filter(|m| !ROOTS.contains(&m.as_str())) {
        visit(m, &g, &mut Vec::new(), &mut done);
    }
    // Nothing below the root depends on it.
    for (m, deps) in &g {
        if ROOTS.contains(&m.as_str()) {
            continue;
        }
        for r in ROOTS {
            assert!(
                !deps.contains(*r),
                "{m} depends on the composition root {r}"
            );
        }
    }
}

#[test]
fn config_and_throttle_know_nothing_of_smtp_and_policy_nothing_of_admin() {
    let g = graph();
    for (m, forbidden) in [
        ("config", "smtp"),
        ("throttle", "smtp"),
        ("policy", "admin"),
    ] {
        assert!(
            !g[m].contains(forbidden),
            "{m} imports {forbidden}: {:?}",
            g[m]
        );
    }
}

#[test]
fn the_parser_sees_groups_and_skips_tests() {
    let text = "use crate::{a::X, b::{c, d}, e};\nfn f() { crate::g::h(); }\n// crate::comment\n#[cfg(test)]\nmod tests {\n    use crate::t;\n}\n";
    let refs = crate_refs(&production_text(text));
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["a", "b", "e", "g"].map(String::from)
    );
}

/// The paths in backquotes in the first column of the README's layout
/// table.
fn layout_paths() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Layout\n")
        .nth(1)
        .expect("the README has a ## Layout section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut paths = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or("");
        paths.extend(first.split('`').skip(1).step_by(2).map(String::from));
    }
    paths
}

/// Issue 10: the README's layout table matches the tree: every path it
/// names exists, and every file under `src/` is named, by itself or by
/// its folder together with its file name in the row's description.
#[test]
fn the_readme_layout_table_matches_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let paths = layout_paths();
    assert!(!paths.is_empty(), "no layout table found");
    for p in &paths {
        assert!(
            root.join(p).exists(),
            "the layout table names {p}, which does not exist"
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for path in src_files() {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if paths.contains(&rel) {
            continue;
        }
        // A file in a folder row: the row names the folder and the
        // file's path inside it.
        let row = paths
            .iter()
            .filter(|p| p.ends_with('/') && rel.starts_with(p.as_str()))
            .find_map(|folder| {
                let inside = &rel[folder.len()..];
                readme.lines().find(|l| {
                    l.starts_with(&format!("| `{folder}`")) && l.contains(&format!("`{inside}`"))
                })
            });
        assert!(
            row.is_some(),
            "the README's layout table does not name {rel}"
        );
    }
}
