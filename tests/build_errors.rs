//! Bad input gets a clear error from the real binary and changes nothing: an empty file, a
//! csv without the text field, a label that is not a number, a malformed record, a model
//! whose hidden size differs from the store's, an output that already holds a store.

mod build_common;
mod datastore_common;

use std::path::Path;

use build_common::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), 64);
        tiny_model(dir.path(), 32);
        write_jsonl(&dir.path().join("good.jsonl"), &texts(10, 5));
        Fixture { dir }
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn model(&self, hidden: usize) -> String {
        self.p(&format!("tiny-{hidden}.gguf"))
    }
    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.p(name)
    }
    /// A store built from good.jsonl with the 64-wide model.
    fn store(&self) -> String {
        let out = self.p("store");
        let (ok, _, err) = run(&[
            "datastore",
            "build",
            "--input",
            &self.p("good.jsonl"),
            "--out",
            &out,
            "--model",
            &self.model(64),
            "--window",
            "32",
        ]);
        assert!(ok, "{err}");
        out
    }
}

/// Runs a failing command; asserts it fails with stderr containing every `needle`.
fn fails(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = run(args);
    assert!(!ok, "expected failure: {args:?}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn build_fails(f: &Fixture, extra: &[&str], needles: &[&str]) {
    let out = f.p("new-store");
    let model = f.model(64);
    let mut args = vec![
        "datastore",
        "build",
        "--out",
        &out,
        "--model",
        &model,
        "--window",
        "32",
    ];
    args.extend_from_slice(extra);
    fails(&args, needles);
    assert!(!Path::new(&out).exists(), "a failed build created {out}");
    let staging = f.p(".new-store.partial");
    assert!(
        !Path::new(&staging).exists(),
        "a failed build left {staging}"
    );
}

#[test]
fn bad_inputs_to_build_are_refused_before_anything_is_written() {
    let f = Fixture::new();
    let empty = f.write("empty.txt", "");
    build_fails(&f, &["--input", &empty], &["empty.txt", "empty"]);
    let blank = f.write("blank.jsonl", "\n\n");
    build_fails(&f, &["--input", &blank], &["blank.jsonl", "empty"]);

    let csv = f.write("nofield.csv", "id,comment_text,toxic\n1,hello world,1\n");
    build_fails(
        &f,
        &["--input", &csv],
        &["nofield.csv:1", "\"text\"", "comment_text"],
    );
    build_fails(
        &f,
        &[
            "--input",
            &csv,
            "--text-field",
            "comment_text",
            "--label-field",
            "toxicity",
            "--min-label",
            "0.5",
        ],
        &["\"toxicity\"", "comment_text, toxic"],
    );

    let bad_label = f.write(
        "label.csv",
        "text,toxicity\nfine words,0.1\nbad words,high\n",
    );
    build_fails(
        &f,
        &[
            "--input",
            &bad_label,
            "--label-field",
            "toxicity",
            "--min-label",
            "0.5",
        ],
        &["label.csv:3", "\"toxicity\"", "high", "not a number"],
    );
    let bad_json_label = f.write(
        "label.jsonl",
        "{\"text\": \"a b\", \"toxicity\": \"n/a\"}\n",
    );
    build_fails(
        &f,
        &[
            "--input",
            &bad_json_label,
            "--label-field",
            "toxicity",
            "--max-label",
            "0",
        ],
        &["label.jsonl:1", "not a number"],
    );
    let bad_json = f.write("broken.jsonl", "{\"text\": \"ok\"}\n{\"text\": \n");
    build_fails(&f, &["--input", &bad_json], &["broken.jsonl:2", "JSON"]);
    let ragged = f.write("ragged.csv", "text,toxicity\n\"a, b\",0.9,extra\n");
    build_fails(&f, &["--input", &ragged], &["ragged.csv:2", "3 fields"]);

    let none = f.write("none.jsonl", "{\"text\": \"x\", \"toxicity\": 0.1}\n");
    build_fails(
        &f,
        &[
            "--input",
            &none,
            "--label-field",
            "toxicity",
            "--min-label",
            "0.5",
        ],
        &["no document selected", "toxicity >= 0.5"],
    );
    let txt = f.write("plain.txt", "one\ntwo\n");
    build_fails(
        &f,
        &[
            "--input",
            &txt,
            "--label-field",
            "toxicity",
            "--min-label",
            "0.5",
        ],
        &["plain text", "no labels"],
    );
    build_fails(&f, &["--input", &f.p("missing.jsonl")], &["missing.jsonl"]);
}

#[test]
fn bad_inputs_to_add_leave_the_store_byte_identical() {
    let f = Fixture::new();
    let store = f.store();
    let before = datastore_common::snapshot(Path::new(&store));
    let empty = f.write("empty.jsonl", "");
    let nofield = f.write("nofield.csv", "body\nhello\n");
    let bad_label = f.write("label.jsonl", "{\"text\": \"a\", \"score\": [1]}\n");
    let good = f.p("good.jsonl");
    let m64 = f.model(64);
    let m32 = f.model(32);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--input", &empty, "--model", &m64], vec!["empty"]),
        (
            vec!["--input", &nofield, "--model", &m64],
            vec!["nofield.csv:1", "\"text\"", "body"],
        ),
        (
            vec![
                "--input",
                &bad_label,
                "--model",
                &m64,
                "--label-field",
                "score",
                "--min-label",
                "1",
            ],
            vec!["label.jsonl:1", "not a number"],
        ),
        (
            vec!["--input", &good, "--model", &m32],
            vec![
                "does not match",
                "hidden size differs: 64",
                "32",
                "nothing was changed",
            ],
        ),
        (
            vec![
                "--input",
                &good,
                "--model",
                &m64,
                "--key-type",
                "final_hidden",
            ],
            vec!["last_ffn_input", "final_hidden"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["datastore", "add", &store, "--window", "32"];
        args.extend(extra);
        fails(&args, &needles);
        assert_eq!(
            datastore_common::snapshot(Path::new(&store)),
            before,
            "a failed add changed the store: {args:?}"
        );
    }
    // Building over an existing store is refused too.
    fails(
        &[
            "datastore",
            "build",
            "--input",
            &good,
            "--out",
            &store,
            "--model",
            &m64,
            "--window",
            "32",
        ],
        &["already holds a datastore", "datastore add"],
    );
    assert_eq!(datastore_common::snapshot(Path::new(&store)), before);
}
