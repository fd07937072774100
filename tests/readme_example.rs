//! The README's library example is the crate doc's doctest (which `cargo test` compiles and
//! runs), less the doctest's hidden set-up lines: if either changes alone, this fails.

use std::path::Path;

#[test]
fn the_readme_example_is_the_crate_doctest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();

    let start = readme
        .find("```rust\n")
        .expect("README has a ```rust block")
        + 8;
    let end = start + readme[start..].find("```").unwrap();
    let in_readme: Vec<&str> = readme[start..end].lines().collect();

    let doc: Vec<&str> = lib
        .lines()
        .map_while(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let open = doc
        .iter()
        .position(|l| *l == "```rust")
        .expect("crate doc has a ```rust block");
    let close = open + 1 + doc[open + 1..].iter().position(|l| *l == "```").unwrap();
    let in_doc: Vec<&str> = doc[open + 1..close]
        .iter()
        .copied()
        .filter(|l| !(l.starts_with("# ") || *l == "#"))
        .collect();

    assert_eq!(
        in_doc, in_readme,
        "README.md's example and src/lib.rs's doctest differ"
    );
}
