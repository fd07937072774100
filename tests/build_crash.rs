//! `datastore build` and `datastore add` processes (the real binary) killed with SIGKILL at
//! several points never leave a store that opens with partial or wrong data:
//! - a killed build leaves either no store at the output path or the complete one, and a
//!   rerun resumes (or restarts) and produces exactly the rows of an uninterrupted build;
//! - a killed add leaves the store with exactly its previous rows (files byte-identical) or
//!   with the previous rows plus the complete new segment.

mod build_common;
mod datastore_common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use build_common::*;
use goodtriever::datastore::{Datastore, DatastoreError};

const FRACTIONS: [f64; 7] = [0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9];

fn spawn(args: &[String]) -> Child {
    bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn goodtriever")
}

fn build_args(input: &Path, out: &Path, model: &Path, keep_segments: bool) -> Vec<String> {
    [
        "datastore",
        "build",
        "--window",
        "32",
        "--stride",
        "16",
        "--segment-tokens",
        "600",
        "--dtype",
        "f32",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(keep_segments.then(|| "--keep-segments".to_string()))
    .chain(["--input".into(), input.display().to_string()])
    .chain(["--out".into(), out.display().to_string()])
    .chain(["--model".into(), model.display().to_string()])
    .collect()
}

fn rows(raw: &[RawSegment]) -> (Vec<f32>, Vec<u32>) {
    let mut k = Vec::new();
    let mut v = Vec::new();
    for s in raw {
        k.extend_from_slice(&s.keys);
        v.extend_from_slice(&s.values);
    }
    (k, v)
}

#[test]
fn a_killed_build_never_publishes_a_partial_store_and_a_rerun_completes_it() {
    killed_build(true);
}

/// The default build merges its chunks into one segment at the end: a kill during the merge
/// or after it must resume just as well.
#[test]
fn a_killed_merged_build_never_publishes_a_partial_store_and_a_rerun_completes_it() {
    killed_build(false);
}

fn killed_build(keep_segments: bool) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64);
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &texts(200, 11));

    let reference = dir.path().join("reference");
    let t = Instant::now();
    let out = spawn(&build_args(&input, &reference, &model, keep_segments))
        .wait_with_output()
        .unwrap();
    let full = t.elapsed();
    assert!(out.status.success());
    let want = rows(&raw_segments(&reference));
    let n_segments = raw_segments(&reference).len();
    if keep_segments {
        assert!(
            n_segments >= 4,
            "only {n_segments} segments; the test needs several"
        );
    } else {
        assert_eq!(n_segments, 1, "the chunks were not merged");
    }

    let target = dir.path().join("store");
    let staging = dir.path().join(".store.partial");
    let mut saw_partial = false;
    let mut finished = false;
    let mut finished_by_kill = false;
    for f in FRACTIONS {
        let mut child = spawn(&build_args(&input, &target, &model, keep_segments));
        std::thread::sleep(full.mul_f64(f));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        match Datastore::open(&target) {
            Ok(ds) => {
                // Only a complete store may appear at the output path.
                assert_eq!(
                    rows(&raw_segments(&target)),
                    want,
                    "published store differs (kill at {f})"
                );
                assert!(ds.verify().unwrap().is_ok());
                finished = true;
                // The process may have been killed after the publishing rename.
                finished_by_kill = !status.success();
                break;
            }
            Err(DatastoreError::NotFound(_)) => {
                assert!(!status.success(), "a successful build left no store");
                assert!(
                    !target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(),
                    "something but a store appeared at the output path"
                );
            }
            Err(e) => panic!("after a kill at {f} of the run the output fails to open: {e}"),
        }
        let partial = staging.join("store");
        if partial.join("manifest.json").exists() {
            let ds = Datastore::open(&partial).expect("the staging store opens after a kill");
            if !ds.segments().is_empty() {
                saw_partial = true;
                // What the staging store holds is a prefix of the reference rows.
                let (k, v) = rows(&raw_segments(&partial));
                assert_eq!(&want.1[..v.len()], &v[..]);
                assert_eq!(&want.0[..k.len()], &k[..]);
            }
        }
    }
    if !finished {
        let out = spawn(&build_args(&input, &target, &model, keep_segments))
            .wait_with_output()
            .unwrap();
        assert!(out.status.success());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if saw_partial {
            assert!(
                report["resumed_rows"].as_u64().unwrap() > 0,
                "the rerun did not resume: {report}"
            );
        }
    }
    assert_eq!(rows(&raw_segments(&target)), want);
    assert!(Datastore::open(&target).unwrap().verify().unwrap().is_ok());
    if finished_by_kill {
        // A kill between the publishing rename and the removal of the staging directory
        // leaves the directory behind, but with no store in it: only the build's own lock
        // and journal, which nothing reads once the output holds a store.
        if staging.exists() {
            let mut left: Vec<String> = std::fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            assert!(
                left.iter().all(|n| n == "LOCK" || n == "build.json"),
                "a published build left more than its lock and journal behind: {left:?}"
            );
        }
    } else {
        assert!(
            !staging.exists(),
            "the staging directory survived a finished build"
        );
    }
    assert!(saw_partial || finished, "no kill landed inside the build");
}

#[test]
fn a_killed_add_leaves_the_previous_rows_or_all_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64);
    let base_in = dir.path().join("base.jsonl");
    write_jsonl(&base_in, &texts(30, 1));
    let add_in = dir.path().join("add.jsonl");
    write_jsonl(&add_in, &texts(250, 2));
    let base = dir.path().join("base");
    let (ok, _, err) = run(&[
        "datastore",
        "build",
        "--window",
        "32",
        "--dtype",
        "f32",
        "--input",
        &base_in.display().to_string(),
        "--out",
        &base.display().to_string(),
        "--model",
        &model.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let base_snapshot = datastore_common::snapshot(&base);
    let base_raw = raw_segments(&base);

    let add_args = |store: &Path| -> Vec<String> {
        [
            "datastore",
            "add",
            &store.display().to_string(),
            "--window",
            "32",
            "--input",
            &add_in.display().to_string(),
            "--model",
            &model.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = dir.path().join("reference");
    datastore_common::copy_dir(&base, &reference);
    let t = Instant::now();
    assert!(spawn(&add_args(&reference)).wait().unwrap().success());
    let full = t.elapsed();
    let want = raw_segments(&reference);
    assert_eq!(want.len(), base_raw.len() + 1);

    let (mut kept, mut committed) = (0, 0);
    for (i, f) in FRACTIONS.iter().enumerate() {
        let store = dir.path().join(format!("trial-{i}"));
        datastore_common::copy_dir(&base, &store);
        let mut child = spawn(&add_args(&store));
        std::thread::sleep(full.mul_f64(*f).max(Duration::from_millis(5)));
        let _ = child.kill();
        child.wait().unwrap();
        let ds = Datastore::open(&store).expect("the store must open after a killed add");
        assert!(
            ds.verify().unwrap().is_ok(),
            "verify fails after a kill at {f}"
        );
        let got = raw_segments(&store);
        if got == base_raw {
            kept += 1;
            // Exactly the previous store: every file byte-identical (leftovers were removed
            // by the open above).
            let now = datastore_common::snapshot(&store);
            for (p, b) in &base_snapshot {
                if p.file_name().is_some_and(|n| n != "LOCK") {
                    assert_eq!(now.get(p), Some(b), "{} changed", p.display());
                }
            }
        } else {
            assert_eq!(
                got, want,
                "after a kill at {f} the store holds neither the old nor the new rows"
            );
            committed += 1;
        }
    }
    assert!(
        kept > 0,
        "no kill landed before the commit ({committed} after)"
    );
}
