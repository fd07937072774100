//! Corruption probe: damaged store files are caught and name the damaged file.
//!
//! A small valid store (f32 keys, D = 32, two segments, each with its keys, values and HNSW
//! index file; the second also with the rows' source positions and documents) is copied for every case and one of its files is damaged, seeded: a flipped
//! byte (or a few), a truncation, or garbage appended. The files are every file of the store
//! as listed from its directory: `manifest.json` and every file of every segment directory.
//! Each damage must be caught: either `Datastore::open` refuses the store with an error that
//! names the damaged file, or `verify()` reports a problem whose path is the damaged file.
//!
//! A damaged segment is also never *served*: every segment's files are checked against their
//! checksums before the segment is searched, and [`never_served`] asserts it for every case
//! (every neighbour any search of a store that still opens is a genuine row of the undamaged
//! store, at its true distance).
//!
//! A flip that leaves the manifest's JSON value unchanged (layout whitespace) changes nothing
//! the store means; it is counted, not required to be caught.
//!
//! The number of cases comes from `GOODTRIEVER_CORRUPTION_CASES` (default 42: every file ×
//! every kind of damage, twice). A longer run:
//!
//! ```text
//! GOODTRIEVER_CORRUPTION_CASES=2000 cargo test --release --test corruption_probe -- --nocapture
//! ```
//!
//! A flip inside one of the manifest's strings that keeps the JSON valid (the `model_id` of the
//! fingerprint, a provenance `source`) is caught by the manifest's own checksum at open.

mod datastore_common;

use std::path::{Path, PathBuf};

use datastore_common::{clustered, copy_dir, Rng};
use goodtriever::datastore::{
    CreateOptions, Datastore, KeyDtype, Keys, Provenance, RowSources, SearchParams, SourceSpan,
};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};

const D: usize = 32;
const ROWS: [usize; 2] = [150, 120];
const VOCAB: usize = 49_152;
const K: usize = 8;

/// What was done to a file.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR of non-zero masks at these offsets.
    Flip(Vec<(usize, u8)>),
    /// Cut to this many bytes.
    Truncate(usize),
    /// These bytes added at the end.
    Append(Vec<u8>),
}

fn apply(path: &Path, damage: &Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    match damage {
        Damage::Flip(flips) => {
            for &(at, mask) in flips {
                bytes[at] ^= mask;
            }
        }
        Damage::Truncate(len) => bytes.truncate(*len),
        Damage::Append(extra) => bytes.extend_from_slice(extra),
    }
    std::fs::write(path, bytes).unwrap();
}

fn random_damage(rng: &mut Rng, kind: usize, len: usize) -> Damage {
    match kind {
        0 => {
            let n = 1 + rng.below(3) as usize;
            Damage::Flip(
                (0..n)
                    .map(|_| {
                        let at = rng.below(len as u64) as usize;
                        (at, 1 + rng.below(255) as u8)
                    })
                    .collect(),
            )
        }
        1 => Damage::Truncate(rng.below(len as u64) as usize),
        _ => {
            let n = 1 + rng.below(64) as usize;
            Damage::Append((0..n).map(|_| rng.next_u64() as u8).collect())
        }
    }
}

/// For a flip in a text file (the manifest), the text around each flipped byte before and
/// after, so that a report says what the damage changed.
fn flipped_text(before: &[u8], damage: &Damage) -> String {
    let Damage::Flip(flips) = damage else {
        return String::new();
    };
    if std::str::from_utf8(before).is_err() {
        return String::new();
    }
    let mut out = String::new();
    for &(at, mask) in flips {
        let lo = at.saturating_sub(24);
        let hi = (at + 24).min(before.len());
        let mut after = before[lo..hi].to_vec();
        after[at - lo] ^= mask;
        out.push_str(&format!(
            " [{:?} -> {:?}]",
            String::from_utf8_lossy(&before[lo..hi]),
            String::from_utf8_lossy(&after)
        ));
    }
    out
}

/// Whether both byte strings are JSON documents with the same value (a change of layout
/// whitespace only).
fn same_json(before: &[u8], after: &[u8]) -> bool {
    match (
        serde_json::from_slice::<serde_json::Value>(before),
        serde_json::from_slice::<serde_json::Value>(after),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Every file of the store, relative to it: the manifest and each segment directory's
/// files, as the directory lists them (the lock excluded: it holds no data).
fn store_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("manifest.json")];
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    segs.sort();
    for s in segs {
        let mut files: Vec<_> = std::fs::read_dir(&s)
            .unwrap()
            .flatten()
            .map(|e| e.path().strip_prefix(dir).unwrap().to_path_buf())
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// The undamaged store's rows and the queries every check asks.
pub struct Pristine {
    keys: Vec<f32>,
    values: Vec<u32>,
    queries: Vec<f32>,
}

/// Whether the store at `dir` serves only genuine rows: when it opens, every neighbour that
/// an exact or an HNSW search returns must be a row of the undamaged store, with its value at
/// its true distance (ids are not compared, so a store that leaves a damaged segment out
/// passes). A store that refuses to open, or a search that fails, serves nothing and passes.
/// `Err` says what was served.
pub fn never_served(dir: &Path, pristine: &Pristine) -> Result<(), String> {
    let Ok(ds) = Datastore::open(dir) else {
        return Ok(());
    };
    for (name, params) in [
        ("exact", SearchParams::exact()),
        ("hnsw", SearchParams::default()),
    ] {
        let Ok(answers) = ds.search(&pristine.queries, K, &params) else {
            continue;
        };
        for (qi, row) in answers.iter().enumerate() {
            let q = &pristine.queries[qi * D..(qi + 1) * D];
            for n in row {
                let genuine =
                    pristine
                        .keys
                        .chunks_exact(D)
                        .zip(&pristine.values)
                        .any(|(key, &v)| {
                            let dist: f32 = key.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
                            v == n.value && (dist - n.dist).abs() <= 1e-3 * dist.max(1.0)
                        });
                if !genuine {
                    return Err(format!(
                        "{name} search of query {qi} returned id {} value {} at distance {}, \
                         which no undamaged row has",
                        n.id, n.value, n.dist
                    ));
                }
            }
        }
    }
    Ok(())
}

/// How a damage was caught, if it was.
#[derive(Debug, PartialEq)]
enum Caught {
    /// `open` refused the store, naming the damaged file.
    Open,
    /// `open` accepted it and `verify` named the damaged file.
    Verify,
    /// `open` refused it without naming the damaged file.
    OpenUnnamed(String),
    /// `verify` found problems, none naming the damaged file.
    VerifyUnnamed(String),
    /// `open` accepted it and `verify` found nothing.
    Missed,
}

fn classify(dir: &Path, file: &Path) -> Caught {
    let name = file.display().to_string();
    match Datastore::open(dir) {
        Err(e) => {
            let msg = e.to_string();
            if msg.contains(&name) {
                Caught::Open
            } else {
                Caught::OpenUnnamed(msg)
            }
        }
        Ok(ds) => match ds.verify() {
            Err(e) => {
                let msg = e.to_string();
                if msg.contains(&name) {
                    Caught::Verify
                } else {
                    Caught::VerifyUnnamed(msg)
                }
            }
            Ok(report) if report.problems.is_empty() => Caught::Missed,
            Ok(report) => {
                if report.problems.iter().any(|p| p.path.ends_with(file)) {
                    Caught::Verify
                } else {
                    Caught::VerifyUnnamed(
                        report
                            .problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                    )
                }
            }
        },
    }
}

fn make_store(dir: &Path) -> Pristine {
    let ds = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: ModelFingerprint {
                vocab_size: Some(VOCAB),
                ..ModelFingerprint::named("probe-model", D)
            },
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (i, &n) in ROWS.iter().enumerate() {
        let k = clustered(n, D, 4, 10 + i as u64);
        let mut rng = Rng::new(20 + i as u64);
        let v: Vec<u32> = (0..n).map(|_| rng.below(VOCAB as u64) as u32).collect();
        // The second segment records its rows' source text, as one built from text does.
        let sources = (i == 1).then(|| {
            let documents: Vec<String> = (0..5)
                .map(|d| format!("document {d}: the quiet river runs over the hill"))
                .collect();
            let spans = (0..n)
                .map(|r| {
                    let start = (r % 40) as u32;
                    SourceSpan {
                        document: (r % 5) as u32,
                        start,
                        end: start + 3,
                    }
                })
                .collect();
            RowSources { documents, spans }
        });
        ds.append_with_sources(
            Keys::F32(&k),
            &v,
            Provenance::new("probe").with_label("seed"),
            sources,
            &|_| {},
        )
        .unwrap();
        keys.extend(k);
        values.extend(v);
    }
    assert_eq!(ds.segments().len(), 2);
    assert!(ds.verify().unwrap().is_ok());
    let queries = clustered(6, D, 4, 10);
    Pristine {
        keys,
        values,
        queries,
    }
}

#[test]
fn every_damaged_store_file_is_caught_by_open_or_verify_naming_it() {
    let wall = std::time::Instant::now();
    let cases: usize = std::env::var("GOODTRIEVER_CORRUPTION_CASES")
        .ok()
        .map(|v| {
            v.parse()
                .expect("GOODTRIEVER_CORRUPTION_CASES must be a number")
        })
        .unwrap_or(42);
    let tmp = tempfile::tempdir().unwrap();
    let pristine_dir = tmp.path().join("pristine");
    let pristine = make_store(&pristine_dir);
    let files = store_files(&pristine_dir);
    for f in [
        "manifest.json",
        "keys.bin",
        "values.bin",
        "index.bin",
        "sources.bin",
        "documents.bin",
    ] {
        assert!(
            files.iter().any(|p| p.ends_with(f)),
            "the store has no {f}: {files:?}"
        );
    }
    assert_eq!(
        never_served(&pristine_dir, &pristine),
        Ok(()),
        "the undamaged store"
    );

    let mut rng = Rng::new(8);
    let (mut by_open, mut by_verify, mut harmless) = (0, 0, 0);
    let mut failures = Vec::new();
    let mut served = Vec::new();
    for case in 0..cases {
        // Every file with every kind of damage in turn, the details random.
        let file = &files[case % files.len()];
        let kind = (case / files.len()) % 3;
        let dir = tmp.path().join("case");
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&pristine_dir, &dir);
        let path = dir.join(file);
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        let damage = random_damage(&mut rng, kind, len);
        let before = std::fs::read(&path).unwrap();
        apply(&path, &damage);
        let what = format!(
            "case {case}: {} {damage:?}{}",
            file.display(),
            flipped_text(&before, &damage)
        );
        let after = std::fs::read(&path).unwrap();
        if same_json(&before, &after) {
            // Whitespace inside the manifest's layout: the store means exactly what it meant.
            harmless += 1;
            continue;
        }
        match classify(&dir, file) {
            Caught::Open => by_open += 1,
            Caught::Verify => by_verify += 1,
            other => failures.push(format!("{what}: {other:?}")),
        }
        if let Err(e) = never_served(&dir, &pristine) {
            served.push(format!("{what}: {e}"));
        }
    }
    eprintln!(
        "corruption probe: {cases} damages over {} files in {:?}: {by_open} refused by open, \
         {by_verify} found by verify, {harmless} left the manifest's JSON value unchanged \
         (whitespace), {} not caught with the file named; {} served wrong \
         rows after open",
        files.len(),
        wall.elapsed(),
        failures.len(),
        served.len()
    );
    assert!(
        served.is_empty(),
        "damaged rows served after open:\n{}",
        served.join("\n")
    );
    assert!(
        failures.is_empty(),
        "damages not caught by open or verify naming the file:\n{}",
        failures.join("\n")
    );
}
