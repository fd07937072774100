//! No two source files of the crate import each other in a circle.
//!
//! A circle (`a.rs` uses `b.rs`, which uses `a.rs`, directly or through others) means neither
//! file can be read, changed or moved without the other; shared contracts belong in a module
//! both can use (see docs/architecture.md). This test reads every file under `src/`, follows
//! its `crate::…` and `super::…` paths (grouped `use` trees included) to the file that defines
//! them, and fails naming the files of any circle. A parent module's file (`mod.rs`, `lib.rs`)
//! declaring or re-exporting its own children is not an import; a child using its parent's
//! items is. Unit-test modules (`#[cfg(test)] mod tests`) may reach anywhere and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[test]
fn the_crate_has_no_import_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let circles = circles(&src);
    assert!(
        circles.is_empty(),
        "import circles between source files (move the shared piece into a module both can use):\n{}",
        circles
            .iter()
            .map(|c| format!("  {}", c.join(", ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_deliberate_circle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(
        &src,
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod deep;\n",
    );
    write(&src, "a.rs", "use crate::b::Thing;\npub struct Other;\n");
    write(&src, "b.rs", "pub struct Thing;\n");
    // A grouped import and a comment that mentions crate::a (comments are not imports).
    write(
        &src,
        "c.rs",
        "// crate::a::Other is fine to mention\nuse crate::{b::Thing, deep::leaf::Leaf};\n",
    );
    write(
        &src,
        "deep/mod.rs",
        "pub mod leaf;\npub use leaf::Leaf;\npub struct Root;\n",
    );
    // A child using its parent's item, and its parent re-exporting it: not a circle.
    write(&src, "deep/leaf.rs", "use super::Root;\npub struct Leaf;\n");
    assert!(circles(&src).is_empty(), "{:?}", circles(&src));

    // b now uses a back, through a grouped path: a circle.
    write(
        &src,
        "b.rs",
        "use crate::{a::{self, Other}};\npub struct Thing;\n",
    );
    assert_eq!(
        circles(&src),
        [vec!["a.rs".to_string(), "b.rs".to_string()]]
    );

    // A longer one through super:: paths: deep/leaf -> c -> deep/leaf.
    write(&src, "b.rs", "pub struct Thing;\n");
    write(
        &src,
        "deep/leaf.rs",
        "use super::super::c;\npub struct Leaf;\n",
    );
    assert_eq!(
        circles(&src),
        [vec!["c.rs".to_string(), "deep/leaf.rs".to_string()]]
    );

    // Unit tests may reach anywhere.
    write(
        &src,
        "deep/leaf.rs",
        "pub struct Leaf;\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n",
    );
    assert!(circles(&src).is_empty());
}

fn write(src: &Path, rel: &str, text: &str) {
    let path = src.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Every circle, as the sorted paths (relative to `src`) of its files.
fn circles(src: &Path) -> Vec<Vec<String>> {
    let files = rust_files(src);
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let me = module_path(src, file);
        for (kind, parts) in import_paths(&code_only(&text)) {
            let full = match kind {
                Root::Crate => parts,
                Root::Super => {
                    // `super` is the parent module; each further `super` one more up.
                    let mut base = me[..me.len().saturating_sub(1)].to_vec();
                    let ups = parts.iter().take_while(|p| *p == "super").count();
                    base.truncate(base.len().saturating_sub(ups));
                    base.extend(parts[ups..].iter().cloned());
                    base
                }
            };
            let Some(target) = resolve(src, &full) else {
                continue;
            };
            if &target == file || declares_child(file, &target) {
                continue;
            }
            edges.entry(file.clone()).or_default().insert(target);
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut names: Vec<String> = c
                .iter()
                .map(|p| {
                    p.strip_prefix(src)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/")
                })
                .collect();
            names.sort();
            names
        })
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `lib.rs` and `main.rs` the root.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The deepest file that defines a prefix of `parts`.
fn resolve(src: &Path, parts: &[String]) -> Option<PathBuf> {
    (1..=parts.len()).rev().find_map(|n| {
        let base = parts[..n].iter().fold(src.to_path_buf(), |p, s| p.join(s));
        [base.with_extension("rs"), base.join("mod.rs")]
            .into_iter()
            .find(|c| c.is_file())
    })
}

/// Whether `file` is a parent module's file and `target` lies below it.
fn declares_child(file: &Path, target: &Path) -> bool {
    let is_parent = matches!(
        file.file_name().and_then(|n| n.to_str()),
        Some("mod.rs" | "lib.rs" | "main.rs")
    );
    is_parent && target.starts_with(file.parent().unwrap())
}

/// The text without comments and without a trailing unit-test module.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Copy)]
enum Root {
    Crate,
    Super,
}

/// Every `crate::…` / `super::…` path in `code`, grouped `use` trees expanded.
fn import_paths(code: &str) -> Vec<(Root, Vec<String>)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !is_ident(bytes[i - 1]);
        let root = if word_start && bytes[i..].starts_with(b"crate::") {
            Some((Root::Crate, "crate::".len()))
        } else if word_start && bytes[i..].starts_with(b"super::") {
            Some((Root::Super, "super::".len()))
        } else {
            None
        };
        match root {
            Some((kind, skip)) => {
                let mut paths = Vec::new();
                i = parse_tree(code, i + skip, Vec::new(), &mut paths);
                out.extend(paths.into_iter().map(|p| (kind, p)));
            }
            None => i += 1,
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses `seg::seg::{tree, tree}` from `at`, pushing each full path onto `out`; returns where
/// it stopped.
fn parse_tree(
    code: &str,
    mut at: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let bytes = code.as_bytes();
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'{' {
            at += 1;
            loop {
                at = parse_tree(code, at, prefix.clone(), out);
                while at < bytes.len() && bytes[at] != b',' && bytes[at] != b'}' {
                    at += 1; // `as name`, whitespace
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return at + 1;
                }
                at += 1; // ','
                while at < bytes.len() && bytes[at].is_ascii_whitespace() {
                    at += 1;
                }
                if at < bytes.len() && bytes[at] == b'}' {
                    return at + 1; // a trailing comma
                }
            }
        }
        let start = at;
        while at < bytes.len() && is_ident(bytes[at]) {
            at += 1;
        }
        let seg = &code[start..at];
        if !seg.is_empty() && seg != "self" {
            prefix.push(seg.to_string());
        }
        if !seg.is_empty() && bytes[at..].starts_with(b"::") {
            at += 2;
            continue;
        }
        out.push(prefix);
        return at;
    }
}

/// Tarjan's strongly connected components.
fn strongly_connected(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct State<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a Path, usize>,
        low: BTreeMap<&'a Path, usize>,
        stack: Vec<&'a Path>,
        on_stack: BTreeSet<&'a Path>,
        out: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Path) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let w = w.as_path();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_path_buf());
                if w == v {
                    break;
                }
            }
            s.out.push(comp);
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_path()) {
            visit(&mut s, v);
        }
    }
    s.out
}
