//! Bounded fuzz targets for the inputs goodtriever reads from outside (issue 20, "the probes
//! in the repository"): `.npy` parsing, `manifest.json` parsing, segment and index open, and a
//! protobuf `AdjustRequest` decoded and answered by a real server. Each target is a proptest
//! property that plain `cargo test` runs for a fixed number of cases (256 per store/file
//! target, 64 for the server one), so CI runs them with the normal test command.
//!
//! The property everywhere is "Ok or a typed error, never a panic", plus what an Ok answer
//! must hold (shapes as the header says, neighbours that exist, verify naming damaged files,
//! no INTERNAL/UNKNOWN status and a server that keeps answering).
//!
//! A long campaign: `PROPTEST_CASES` sets every target's case count, e.g.
//!
//! ```text
//! PROPTEST_CASES=100000 CARGO_TARGET_DIR=... cargo test --release --test fuzz_inputs
//! PROPTEST_CASES=20000 cargo test --test fuzz_inputs manifest   # one target
//! ```
//!
//! A failing case is shrunk and its seed saved in `tests/fuzz_inputs.proptest-regressions`;
//! commit that file so the case is replayed first on every later run. Findings fixed in the
//! library keep an explicit regression test at the end of their module here.

mod datastore_common;
mod server_support;

use datastore_common::copy_dir;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;

/// The case count: `PROPTEST_CASES` when set, else `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A byte-level mutation of a file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Append(Vec<u8>),
    Insert(Index, Vec<u8>),
    Delete(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let n = bytes.len();
        match m {
            Mutation::Flip(i, b) if n > 0 => bytes[i.index(n)] ^= 1 << b,
            Mutation::Set(i, v) if n > 0 => bytes[i.index(n)] = *v,
            Mutation::Truncate(i) => bytes.truncate(i.index(n + 1)),
            Mutation::Append(extra) => bytes.extend_from_slice(extra),
            Mutation::Insert(i, extra) => {
                let at = i.index(n + 1);
                bytes.splice(at..at, extra.iter().copied());
            }
            Mutation::Delete(i, k) if n > 0 => {
                let at = i.index(n);
                let end = (at + *k as usize).min(n);
                bytes.drain(at..end);
            }
            _ => {}
        }
    }
}

/// Replaces `path` with `bytes` through a new inode, so maps of the old file stay valid.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("fuzz-tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fresh case directory under `root`.
fn case_dir(root: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = root.join(format!("case{}", N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&d);
    d
}

mod npy {
    use super::*;
    use goodtriever::npy::{read_keys, read_queries, read_values, write_i64, write_keys};
    use goodtriever::npy::{KeyArray, KeyMatrix};
    use half::f16;

    /// The header fields of a hand-written `.npy` file.
    #[derive(Clone, Debug)]
    struct Header {
        version: u8,
        descr: String,
        fortran: String,
        shape: Vec<u64>,
        /// Write exactly the claimed number of data bytes (when small), or `data` as is.
        exact: bool,
        data: Vec<u8>,
    }

    fn dim() -> impl Strategy<Value = u64> {
        prop_oneof![
            6 => 0u64..5,
            1 => Just(1u64 << 32),
            1 => Just(1u64 << 40),
            1 => Just(u64::MAX),
            1 => Just(i64::MAX as u64),
            1 => any::<u64>(),
        ]
    }

    fn header() -> impl Strategy<Value = Header> {
        let descr = prop_oneof![
            Just("<f4"),
            Just("<f2"),
            Just(">f4"),
            Just("<i4"),
            Just("<i8"),
            Just(">i8"),
            Just("<u4"),
            Just("|u1"),
            Just("<f8"),
            Just("|b1"),
            Just("<c8"),
            Just("|S3"),
            Just("|O"),
            Just("<U2"),
            Just("[('a', '<f4')]"),
            Just("zz"),
        ]
        .prop_map(|d| {
            if d.starts_with('[') {
                d.to_string()
            } else {
                format!("'{d}'")
            }
        });
        let fortran = prop_oneof![Just("False"), Just("True"), Just("0"), Just("'x'")];
        (
            prop_oneof![Just(1u8), Just(2), Just(3), Just(0), Just(9)],
            descr,
            fortran,
            prop::collection::vec(dim(), 0..4),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..96),
        )
            .prop_map(|(version, descr, fortran, shape, exact, data)| Header {
                version,
                descr,
                fortran: fortran.to_string(),
                shape,
                exact,
                data,
            })
    }

    fn item_size(descr: &str) -> u64 {
        match descr {
            "'<f2'" => 2,
            "'<f8'" | "'<i8'" | "'>i8'" | "'<c8'" => 8,
            "'|u1'" | "'|b1'" => 1,
            "'|S3'" => 3,
            _ => 4,
        }
    }

    fn encode(h: &Header) -> Vec<u8> {
        let shape = match h.shape.len() {
            1 => format!("({},)", h.shape[0]),
            _ => format!(
                "({})",
                h.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut dict = format!(
            "{{'descr': {}, 'fortran_order': {}, 'shape': {shape}, }}",
            h.descr, h.fortran
        );
        let len_bytes = if h.version == 1 { 2 } else { 4 };
        let pre = 6 + 2 + len_bytes;
        while (pre + dict.len() + 1) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend_from_slice(&[h.version, 0]);
        if h.version == 1 {
            out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        let claimed = h
            .shape
            .iter()
            .try_fold(item_size(&h.descr), |a, &d| a.checked_mul(d));
        match claimed {
            Some(n) if h.exact && n <= 4096 => out.extend(
                (0..n as usize).map(|i| h.data.get(i % h.data.len().max(1)).copied().unwrap_or(0)),
            ),
            _ => out.extend_from_slice(&h.data),
        }
        out
    }

    /// A file the crate's own writers produce.
    fn written(dir: &Path, kind: u8, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let p = dir.join("w.npy");
        let mut rng = server_support::Rng::new(seed);
        match kind % 3 {
            0 => write_keys(
                &p,
                &KeyMatrix {
                    rows,
                    dim: cols,
                    data: KeyArray::F32(rng.vec(rows * cols, 4.0)),
                },
            ),
            1 => write_keys(
                &p,
                &KeyMatrix {
                    rows,
                    dim: cols,
                    data: KeyArray::F16(
                        rng.vec(rows * cols, 4.0)
                            .into_iter()
                            .map(f16::from_f32)
                            .collect(),
                    ),
                },
            ),
            _ => write_i64(
                &p,
                rows,
                1,
                &(0..rows)
                    .map(|_| rng.below(1000) as i64)
                    .collect::<Vec<_>>(),
            ),
        }
        .unwrap();
        std::fs::read(&p).unwrap()
    }

    #[derive(Clone, Debug)]
    enum Input {
        Raw(Vec<u8>),
        Hand(Header),
        Written(u8, usize, usize, u64),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::Raw),
            3 => header().prop_map(Input::Hand),
            2 => (any::<u8>(), 0usize..6, 0usize..5, any::<u64>())
                .prop_map(|(k, r, c, s)| Input::Written(k, r, c, s)),
        ]
    }

    /// The shape a header claims, when the file has a readable header.
    fn claimed_shape(bytes: &[u8]) -> Option<Vec<u64>> {
        npyz::NpyFile::new(bytes).ok().map(|f| f.shape().to_vec())
    }

    /// Reads `bytes` with every reader; checks Ok answers against the header.
    fn check(path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
        std::fs::write(path, bytes).unwrap();
        if let Ok(m) = read_keys(path) {
            let shape = claimed_shape(bytes).expect("Ok keys from an unreadable header");
            prop_assert_eq!(shape.len(), 2);
            prop_assert_eq!((m.rows as u64, m.dim as u64), (shape[0], shape[1]));
            let len = match &m.data {
                KeyArray::F32(v) => v.len(),
                KeyArray::F16(v) => v.len(),
            };
            prop_assert_eq!(len, m.rows * m.dim);
        }
        if let Ok((rows, dim, data)) = read_queries(path) {
            let shape = claimed_shape(bytes).expect("Ok queries from an unreadable header");
            prop_assert_eq!((rows as u64, dim as u64), (shape[0], shape[1]));
            prop_assert_eq!(data.len(), rows * dim);
        }
        if let Ok(v) = read_values(path) {
            let shape = claimed_shape(bytes).expect("Ok values from an unreadable header");
            prop_assert!(shape.len() == 1 || (shape.len() == 2 && shape[1] == 1));
            prop_assert_eq!(v.len() as u64, shape[0]);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn npy_readers_never_panic(
            input in input(),
            muts in prop::collection::vec(mutation(), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = match &input {
                Input::Raw(b) => b.clone(),
                Input::Hand(h) => encode(h),
                Input::Written(k, r, c, s) => written(dir.path(), *k, *r, *c, *s),
            };
            mutate(&mut bytes, &muts);
            check(&dir.path().join("in.npy"), &bytes)?;
        }
    }

    /// Findings, kept as explicit cases: shapes whose element count or strides overflow u64.
    #[test]
    fn overflowing_shapes_are_refused_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.npy");
        for shape in [
            vec![u64::MAX, 2],
            vec![1 << 40, 1 << 40],
            vec![1 << 40, 1 << 40, 0],
            vec![u64::MAX],
            vec![3, u64::MAX, 1],
        ] {
            for descr in ["'<f4'", "'<i8'", "'<u4'"] {
                for fortran in ["False", "True"] {
                    let h = Header {
                        version: 1,
                        descr: descr.into(),
                        fortran: fortran.into(),
                        shape: shape.clone(),
                        exact: false,
                        data: vec![0; 16],
                    };
                    check(&path, &encode(&h)).unwrap();
                    assert!(read_keys(&path).is_err());
                    assert!(read_values(&path).is_err());
                }
            }
        }
    }
}

/// Shared by the store targets: a small valid store to copy for every case.
mod base {
    use super::*;
    use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance};
    use goodtriever::fingerprint::KeyType;

    pub const DIM: usize = 8;

    pub struct Base {
        pub _root: tempfile::TempDir,
        pub dir: PathBuf,
        pub values: Vec<u32>,
        pub keys: Vec<f32>,
    }

    /// Two segments (30 and 20 rows) of a `dtype` store in a fresh tempdir.
    pub fn store(dtype: KeyDtype) -> Base {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("base");
        let mut fp = server_support::fingerprint();
        fp.hidden_size = DIM;
        let store = Datastore::create(
            &dir,
            CreateOptions {
                fingerprint: fp,
                key_type: KeyType::LastFfnInput,
                dtype,
            },
        )
        .unwrap();
        let mut rng = server_support::Rng::new(7);
        let mut all_keys = Vec::new();
        let mut all_values = Vec::new();
        for rows in [30, 20] {
            let keys = rng.vec(rows * DIM, 2.0);
            let values: Vec<u32> = (0..rows).map(|_| rng.below(150)).collect();
            store
                .append(Keys::F32(&keys), &values, Provenance::new("fuzz"))
                .unwrap();
            all_keys.extend(keys);
            all_values.extend(values);
        }
        drop(store);
        Base {
            _root: root,
            dir,
            values: all_values,
            keys: all_keys,
        }
    }
}

/// Opens `dir` and, when it opens, checks that searches and row reads hold together.
fn open_and_search(dir: &Path, query: &[f32], stored: Option<&[u32]>) -> Result<(), TestCaseError> {
    use goodtriever::datastore::{Datastore, SearchParams};
    let Ok(store) = Datastore::open(dir) else {
        return Ok(());
    };
    let _ = store.verify();
    let _ = store.segments();
    let len = store.len() as u64;
    if query.len() != store.dim() {
        // A manifest whose hidden size changed: searches must refuse the query, not panic.
        let _ = store.search(query, 4, &SearchParams::exact());
        return Ok(());
    }
    for params in [SearchParams::exact(), SearchParams::hnsw(None)] {
        let Ok(rows) = store.search(query, 4, &params) else {
            continue;
        };
        for n in rows.iter().flatten() {
            prop_assert!(n.id < len, "neighbour {} of {len} rows", n.id);
            if let Ok(row) = store.row(n.id) {
                prop_assert_eq!(row.value, n.value);
            }
            if let Some(stored) = stored {
                prop_assert!(stored.contains(&n.value), "value {} never stored", n.value);
            }
        }
    }
    for id in [0, len.saturating_sub(1), len, u64::MAX] {
        let _ = store.row(id);
    }
    Ok(())
}

mod manifest {
    use super::*;
    use goodtriever::datastore::KeyDtype;
    use serde_json::Value;
    use std::sync::OnceLock;

    fn base() -> &'static base::Base {
        static B: OnceLock<base::Base> = OnceLock::new();
        B.get_or_init(|| base::store(KeyDtype::F32))
    }

    const POINTERS: &[&str] = &[
        "/segments/0/rows",
        "/segments/1/rows",
        "/segments/0/id",
        "/segments/1/id",
        "/segments/0/files/0/bytes",
        "/segments/0/files/1/bytes",
        "/segments/1/files/2/bytes",
        "/segments/0/files/0/crc32",
        "/segments/0/files/2/name",
        "/segments/0/retired",
        "/segments/0/index/m",
        "/fingerprint/hidden_size",
        "/fingerprint/vocab_size",
        "/next_segment_id",
        "/generation",
        "/dtype",
        "/key_type",
        "/format_version",
        "/segments",
        "/segments/0/files",
    ];

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(serde_json::json!(0)),
            Just(serde_json::json!(1)),
            Just(serde_json::json!(2)),
            Just(serde_json::json!(-1)),
            Just(serde_json::json!(7)),
            Just(serde_json::json!(u32::MAX)),
            Just(serde_json::json!(u64::MAX)),
            Just(serde_json::json!(i64::MIN)),
            Just(serde_json::json!(1u64 << 53)),
            Just(serde_json::json!(1u64 << 62)),
            Just(serde_json::json!(usize::MAX / 4 + 1)),
            Just(serde_json::json!(1.5)),
            Just(serde_json::json!(1e300)),
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            any::<i32>().prop_map(|n| serde_json::json!(n)),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => number(),
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::Bool),
            1 => prop_oneof![Just("f16"), Just("f32"), Just("keys.bin"), Just(""), Just("x")]
                .prop_map(|s| Value::String(s.into())),
            1 => Just(serde_json::json!([])),
            1 => Just(serde_json::json!({})),
        ]
    }

    #[derive(Clone, Debug)]
    enum Edit {
        /// Replace the value at one of `POINTERS` (or, `None`, at any path).
        Replace(Option<Index>, Index, Value),
        /// Remove the key at a path (from its object) or the element (from its array).
        Remove(Option<Index>, Index),
        /// Copy one array element after itself (e.g. a segment listed twice).
        Duplicate(Index),
        /// Insert `"key": value` at the start of an object, in the text (duplicate keys).
        TextKey(Index, Index, Value),
    }

    const KEYS: &[&str] = &[
        "id",
        "rows",
        "bytes",
        "crc32",
        "name",
        "retired",
        "hidden_size",
        "next_segment_id",
        "dtype",
        "generation",
        "unknown_field",
    ];

    fn edit() -> impl Strategy<Value = Edit> {
        let which = prop::option::weighted(0.7, any::<Index>());
        prop_oneof![
            4 => (which.clone(), any::<Index>(), value())
                .prop_map(|(w, i, v)| Edit::Replace(w, i, v)),
            1 => (which, any::<Index>()).prop_map(|(w, i)| Edit::Remove(w, i)),
            1 => any::<Index>().prop_map(Edit::Duplicate),
            1 => (any::<Index>(), any::<Index>(), value())
                .prop_map(|(a, b, v)| Edit::TextKey(a, b, v)),
        ]
    }

    fn paths(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    let p = format!("{at}/{k}");
                    out.push(p.clone());
                    paths(c, p, out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    let p = format!("{at}/{i}");
                    out.push(p.clone());
                    paths(c, p, out);
                }
            }
            _ => {}
        }
    }

    fn pick(v: &Value, which: &Option<Index>, any_path: &Index) -> String {
        match which {
            Some(i) => POINTERS[i.index(POINTERS.len())].to_string(),
            None => {
                let mut all = Vec::new();
                paths(v, String::new(), &mut all);
                all[any_path.index(all.len())].clone()
            }
        }
    }

    fn split(p: &str) -> (&str, &str) {
        let cut = p.rfind('/').unwrap();
        (&p[..cut], &p[cut + 1..])
    }

    /// Applies the edits; text edits come last, on the serialised JSON.
    /// The manifest's JSON without its own `crc32`.
    fn unchecked(bytes: &[u8]) -> Value {
        let mut v: Value = serde_json::from_slice(bytes).unwrap();
        v.as_object_mut().unwrap().remove("crc32");
        v
    }

    fn apply(v: &mut Value, edits: &[Edit]) -> Vec<u8> {
        let mut text_keys = Vec::new();
        for e in edits {
            match e {
                Edit::Replace(w, i, new) => {
                    let p = pick(v, w, i);
                    if let Some(slot) = v.pointer_mut(&p) {
                        *slot = new.clone();
                    }
                }
                Edit::Remove(w, i) => {
                    let p = pick(v, w, i);
                    let (parent, last) = split(&p);
                    match v.pointer_mut(parent) {
                        Some(Value::Object(m)) => {
                            m.remove(last);
                        }
                        Some(Value::Array(a)) => {
                            if let Ok(n) = last.parse::<usize>() {
                                if n < a.len() {
                                    a.remove(n);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Edit::Duplicate(i) => {
                    let mut all = Vec::new();
                    paths(v, String::new(), &mut all);
                    let arrays: Vec<&String> = all
                        .iter()
                        .filter(|p| matches!(v.pointer(p), Some(Value::Array(a)) if !a.is_empty()))
                        .collect();
                    if !arrays.is_empty() {
                        let p = arrays[i.index(arrays.len())].clone();
                        if let Some(Value::Array(a)) = v.pointer_mut(&p) {
                            let first = a[0].clone();
                            a.insert(1, first);
                        }
                    }
                }
                Edit::TextKey(a, b, val) => text_keys.push((*a, *b, val.clone())),
            }
        }
        let mut text = serde_json::to_string_pretty(v).unwrap();
        for (a, b, val) in text_keys {
            let opens: Vec<usize> = text.match_indices('{').map(|(i, _)| i).collect();
            let at = opens[a.index(opens.len())] + 1;
            let key = KEYS[b.index(KEYS.len())];
            text.insert_str(at, &format!("\"{key}\": {val},"));
        }
        text.into_bytes()
    }

    #[derive(Clone, Debug)]
    enum Input {
        Raw(Vec<u8>),
        Json(Vec<Edit>),
        Bytes(Vec<Mutation>),
        /// One fixed edit (the regression cases).
        Set(&'static str, Value),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(Input::Raw),
            6 => prop::collection::vec(edit(), 1..4).prop_map(Input::Json),
            2 => prop::collection::vec(mutation(), 1..4).prop_map(Input::Bytes),
        ]
    }

    fn run(input: &Input) -> Result<(), TestCaseError> {
        let b = base();
        let dir = case_dir(b._root.path());
        copy_dir(&b.dir, &dir);
        let mpath = dir.join("manifest.json");
        let orig = std::fs::read(&mpath).unwrap();
        let bytes = match input {
            Input::Raw(r) => r.clone(),
            // Structured edits go to a manifest without its own checksum (as one written before
            // it existed), so they reach the checks behind it; byte-level damage keeps it.
            Input::Json(edits) => apply(&mut unchecked(&orig), edits),
            Input::Bytes(muts) => {
                let mut o = orig.clone();
                mutate(&mut o, muts);
                o
            }
            Input::Set(p, new) => {
                let mut v = unchecked(&orig);
                *v.pointer_mut(p).unwrap() = new.clone();
                serde_json::to_vec(&v).unwrap()
            }
        };
        // A handle opened before the change sees it through refresh and verify.
        let held = goodtriever::datastore::Datastore::open(&dir).unwrap();
        replace_file(&mpath, &bytes);
        let _ = held.refresh();
        let _ = held.verify();
        if !held.is_empty() {
            let q = &b.keys[..base::DIM];
            let _ = held.search(q, 4, &goodtriever::datastore::SearchParams::exact());
        }
        drop(held);
        let r = open_and_search(&dir, &b.keys[..base::DIM], Some(&b.values));
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn manifest_parsing_never_panics(input in input()) {
            run(&input)?;
        }
    }

    /// Findings, kept as explicit cases: row counts and hidden sizes whose byte sizes overflow,
    /// and vocabulary sizes an open would have allocated a per-token table for (an abort on
    /// out-of-memory, not a panic, in CI).
    #[test]
    fn overflowing_rows_and_hidden_sizes_are_refused() {
        for (p, v) in [
            ("/fingerprint/vocab_size", serde_json::json!(u64::MAX)),
            ("/fingerprint/vocab_size", serde_json::json!(1u64 << 56)),
            ("/fingerprint/vocab_size", serde_json::json!(0)),
            ("/segments/0/rows", serde_json::json!(u64::MAX)),
            ("/segments/0/rows", serde_json::json!(1u64 << 62)),
            ("/fingerprint/hidden_size", serde_json::json!(u64::MAX)),
            ("/fingerprint/hidden_size", serde_json::json!(1u64 << 62)),
        ] {
            run(&Input::Set(p, v)).unwrap();
        }
    }

    #[test]
    fn a_vocabulary_beyond_the_limit_is_refused_at_open_with_the_reason() {
        let b = base();
        for v in [serde_json::json!(0), serde_json::json!(u64::MAX)] {
            let dir = case_dir(b._root.path());
            copy_dir(&b.dir, &dir);
            let mpath = dir.join("manifest.json");
            let mut m = unchecked(&std::fs::read(&mpath).unwrap());
            *m.pointer_mut("/fingerprint/vocab_size").unwrap() = v.clone();
            replace_file(&mpath, &serde_json::to_vec(&m).unwrap());
            let err = goodtriever::datastore::Datastore::open(&dir).unwrap_err();
            assert!(err.to_string().contains("vocabulary size"), "{v}: {err}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

mod segment {
    use super::*;
    use goodtriever::datastore::{Datastore, KeyDtype};
    use serde_json::Value;
    use std::sync::OnceLock;

    fn base(f16: bool) -> &'static base::Base {
        static B32: OnceLock<base::Base> = OnceLock::new();
        static B16: OnceLock<base::Base> = OnceLock::new();
        if f16 {
            B16.get_or_init(|| base::store(KeyDtype::F16))
        } else {
            B32.get_or_init(|| base::store(KeyDtype::F32))
        }
    }

    const FILES: &[&str] = &["keys.bin", "values.bin", "index.bin"];

    fn run(f16: bool, seg: usize, file: usize, muts: &[Mutation]) -> Result<(), TestCaseError> {
        let b = base(f16);
        let dir = case_dir(b._root.path());
        copy_dir(&b.dir, &dir);
        // A handle on the sound store, so verify can run even where a fresh open is refused.
        let store = Datastore::open(&dir).unwrap();
        let mpath = dir.join("manifest.json");
        let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        let id = m["segments"][seg]["id"].as_u64().unwrap();
        let name = FILES[file];
        let fpath = dir.join("segments").join(id.to_string()).join(name);
        let orig = std::fs::read(&fpath).unwrap();
        let mut bytes = orig.clone();
        mutate(&mut bytes, muts);
        replace_file(&fpath, &bytes);
        // Record the new size (not the new CRC), so the size checks pass and deeper ones run;
        // drop the manifest's own checksum (as a manifest written before it has none), or the
        // edit itself would be what open refuses.
        for f in m["segments"][seg]["files"].as_array_mut().unwrap() {
            if f["name"] == name {
                f["bytes"] = Value::from(bytes.len() as u64);
            }
        }
        m.as_object_mut().unwrap().remove("crc32");
        replace_file(&mpath, &serde_json::to_vec_pretty(&m).unwrap());

        let report = store.verify().expect("the manifest is readable");
        if bytes != orig {
            prop_assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.path.ends_with(name) || p.path.ends_with(format!("segments/{id}"))),
                "damaged {name} not reported: {:?}",
                report.problems
            );
            prop_assert!(
                report.problems.iter().any(|p| p.path.ends_with(name)),
                "verify does not name {name}: {:?}",
                report.problems
            );
        } else {
            prop_assert!(report.is_ok(), "{:?}", report.problems);
        }
        drop(store);
        // Open checks sizes, not CRCs (verify's job), so damaged values may be served here.
        let stored = (name != "values.bin").then_some(&b.values[..]);
        let r = open_and_search(&dir, &b.keys[..base::DIM], stored);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn segment_and_index_open_never_panic(
            f16 in any::<bool>(),
            seg in 0usize..2,
            file in 0usize..3,
            muts in prop::collection::vec(mutation(), 1..4),
        ) {
            run(f16, seg, file, &muts)?;
        }
    }
}

mod server {
    use super::*;
    use bytes::{Buf, BufMut};
    use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient, Tensor};
    use goodtriever::server::ServeOptions;
    use prost::Message;
    use server_support::{f32_bytes, Rng, DIM, VOCAB};
    use std::sync::OnceLock;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::transport::Channel;
    use tonic::{Code, Status};

    /// One server for every case of the target, on its own runtime.
    struct Fixture {
        rt: tokio::runtime::Runtime,
        client: GoodtrieverClient<Channel>,
        channel: Channel,
        _server: server_support::Running,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let engine = server_support::engine(dir.path(), server_support::defaults());
            let (server, client, channel) = rt.block_on(async {
                let server = server_support::start(engine, ServeOptions::default()).await;
                let client = server.client().await;
                let channel = server.channel().await;
                (server, client, channel)
            });
            Fixture {
                rt,
                client,
                channel,
                _server: server,
                _dir: dir,
            }
        })
    }

    fn good_request() -> proto::AdjustRequest {
        proto::AdjustRequest {
            hidden: Some(Tensor {
                data: f32_bytes(&Rng::new(3).vec(DIM, 2.0)).into(),
                dtype: proto::DType::F32 as i32,
                rows: 1,
            }),
            ..Default::default()
        }
    }

    /// Mostly ordinary parameter values, sometimes extreme ones.
    fn float() -> impl Strategy<Value = f32> {
        prop_oneof![4 => 0.05f32..1.0, 1 => special_float()]
    }

    fn special_float() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(3e38f32),
            Just(-3e38),
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(-1.0),
            Just(0.0),
            Just(-0.0),
            Just(1e-45),
            Just(0.5),
            Just(1.0),
            Just(2.0),
            Just(1e30),
            any::<f32>(),
        ]
    }

    /// A protobuf enum field: mostly one of the `0..=max` values, sometimes none of them.
    fn enum_value(max: i32) -> impl Strategy<Value = i32> {
        prop_oneof![
            24 => 0..=max,
            1 => Just(max + 1),
            1 => Just(-1),
            1 => Just(i32::MAX),
            1 => Just(i32::MIN),
            1 => any::<i32>(),
        ]
    }

    /// A tensor of `cols` columns: valid f32 rows, then changed in dtype, rows and bytes.
    fn tensor(cols: usize) -> impl Strategy<Value = Tensor> {
        (
            prop_oneof![1 => Just(0usize), 5 => 1usize..4],
            any::<u64>(),
            prop::option::weighted(
                0.3,
                prop::collection::vec((any::<Index>(), special_float()), 1..3),
            ),
            enum_value(3),
            prop::option::weighted(
                0.4,
                prop_oneof![4 => 0u32..4, 1 => Just(u32::MAX), 1 => any::<u32>()],
            ),
            prop::option::weighted(0.3, prop::collection::vec(mutation(), 1..3)),
        )
            .prop_map(move |(rows, seed, specials, dtype, claimed, muts)| {
                let (specials, muts) = (specials.unwrap_or_default(), muts.unwrap_or_default());
                let mut v = Rng::new(seed).vec(rows * cols, 2.0);
                for (i, x) in specials {
                    if !v.is_empty() {
                        let n = v.len();
                        v[i.index(n)] = x;
                    }
                }
                let mut data = f32_bytes(&v);
                // The dtype decides how the bytes are read; keep most f32, vary the rest.
                let dtype = if dtype == 0 {
                    proto::DType::F32 as i32
                } else {
                    dtype
                };
                if dtype == proto::DType::F16 as i32 || dtype == proto::DType::Bf16 as i32 {
                    data.truncate(data.len() / 2);
                }
                mutate(&mut data, &muts);
                Tensor {
                    data: data.into(),
                    dtype,
                    rows: claimed.unwrap_or(rows as u32),
                }
            })
    }

    fn overrides() -> impl Strategy<Value = proto::Overrides> {
        (
            prop::option::of(float()),
            prop::option::of(float()),
            prop::option::of(prop_oneof![
                4 => 1u32..64,
                1 => Just(0u32),
                1 => Just(1),
                1 => Just(4),
                1 => Just(32),
                1 => Just(4096),
                1 => Just(4097),
                1 => Just(u32::MAX),
                1 => any::<u32>()
            ]),
            prop::option::of(float()),
            enum_value(3),
            prop::option::of(float()),
            // The variants: the gate's strength and neighbour count, the prior's weight.
            prop::option::of(float()),
            prop::option::of(prop_oneof![
                2 => 1u32..64,
                1 => Just(0u32),
                1 => Just(8193),
                1 => any::<u32>()
            ]),
            prop::option::of(float()),
            // Skipping: the threshold and the ratio; reuse (refused by a unary call): its
            // share and radius.
            (
                prop::option::of(float()),
                prop::option::of(float()),
                prop::option::of(float()),
                prop::option::of(float()),
                prop::option::of(any::<bool>()),
            ),
        )
            .prop_map(
                |(
                    alpha,
                    temperature,
                    k,
                    filter_p,
                    mode,
                    lambda,
                    gate,
                    gate_neighbours,
                    prior,
                    (skip, skip_ratio, reuse, reuse_radius, skip_in_nucleus),
                )| {
                    proto::Overrides {
                        alpha,
                        temperature,
                        k,
                        filter_p,
                        mode,
                        lambda,
                        gate,
                        gate_neighbours,
                        prior,
                        skip,
                        skip_ratio,
                        skip_in_nucleus,
                        reuse,
                        reuse_radius,
                    }
                },
            )
    }

    fn request() -> impl Strategy<Value = proto::AdjustRequest> {
        (
            prop::option::weighted(0.9, tensor(DIM)),
            prop::option::weighted(0.3, tensor(VOCAB)),
            enum_value(2),
            prop::option::of(overrides()),
            any::<u64>(),
            // Now and then a continuation of a previous step (reuse), of any length and content.
            prop::option::weighted(0.15, prop::collection::vec(any::<u32>(), 0..3)),
            prop::option::weighted(0.15, prop::collection::vec(0u32..4, 0..3)),
        )
            .prop_map(
                |(hidden, logits, form, overrides, step, emitted, continued)| {
                    let (emitted_tokens, continued_rows) =
                        (emitted.unwrap_or_default(), continued.unwrap_or_default());
                    proto::AdjustRequest {
                        hidden,
                        logits,
                        form,
                        overrides,
                        step,
                        // Explain is a separate, unmerged path (tests/server_e2e.rs).
                        explain: None,
                        emitted_tokens,
                        continued_rows,
                    }
                },
            )
    }

    /// Sends a message body as it is: bytes that need not decode as an `AdjustRequest`.
    #[derive(Clone, Default)]
    struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }

    async fn raw_adjust(channel: Channel, body: Vec<u8>) -> Result<(), Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/goodtriever.v1.Goodtriever/Adjust",
        );
        grpc.unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(|_| ())
    }

    /// Sends `reqs` on one stream and reads answers until the stream ends or fails.
    async fn stream(
        client: &mut GoodtrieverClient<Channel>,
        reqs: Vec<proto::AdjustRequest>,
    ) -> Result<(), Status> {
        let mut answers = client
            .adjust_stream(tokio_stream::iter(reqs))
            .await?
            .into_inner();
        while answers.message().await?.is_some() {}
        Ok(())
    }

    fn acceptable(what: &str, r: Result<(), Status>) -> Result<(), TestCaseError> {
        if let Err(s) = r {
            prop_assert!(
                !matches!(s.code(), Code::Internal | Code::Unknown),
                "{what}: {:?} {}",
                s.code(),
                s.message()
            );
        }
        Ok(())
    }

    #[derive(Clone, Debug)]
    enum Input {
        Typed(proto::AdjustRequest),
        /// A valid encoded request, mutated as bytes.
        Encoded(proto::AdjustRequest, Vec<Mutation>),
        Raw(Vec<u8>),
        /// Requests on one `AdjustStream`.
        Stream(Vec<proto::AdjustRequest>),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            6 => request().prop_map(Input::Typed),
            1 => prop::collection::vec(request(), 1..4).prop_map(Input::Stream),
            2 => (request(), prop::collection::vec(mutation(), 1..4))
                .prop_map(|(r, m)| Input::Encoded(r, m)),
            1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(Input::Raw),
        ]
    }

    fn run(input: &Input) -> Result<(), TestCaseError> {
        let f = fixture();
        let mut client = f.client.clone();
        let (what, r) = f.rt.block_on(async {
            match input {
                Input::Typed(req) => ("typed", client.adjust(req.clone()).await.map(|_| ())),
                Input::Encoded(req, muts) => {
                    let mut body = req.encode_to_vec();
                    mutate(&mut body, muts);
                    ("encoded", raw_adjust(f.channel.clone(), body).await)
                }
                Input::Raw(body) => ("raw", raw_adjust(f.channel.clone(), body.clone()).await),
                Input::Stream(reqs) => ("stream", stream(&mut client, reqs.clone()).await),
            }
        });
        if std::env::var("FUZZ_DEBUG").is_ok() {
            eprintln!(
                "{what}: {:?}",
                r.as_ref().map_err(|s| (s.code(), s.message()))
            );
        }
        acceptable(what, r)?;
        let good = f.rt.block_on(client.adjust(good_request()));
        prop_assert!(good.is_ok(), "a good request after a bad one: {good:?}");
        Ok(())
    }

    /// Finding, kept as an explicit case: a body that is not protobuf was answered INTERNAL
    /// (tonic-prost's mapping); it is the request's fault, so INVALID_ARGUMENT.
    #[test]
    fn a_body_that_is_not_protobuf_is_invalid_argument() {
        let f = fixture();
        for body in [vec![0u8], vec![0x0a, 0xff], vec![0xff; 12]] {
            let got = f.rt.block_on(raw_adjust(f.channel.clone(), body.clone()));
            let code = got.as_ref().map_err(|s| s.code()).err();
            assert_eq!(code, Some(Code::InvalidArgument), "{body:?}: {got:?}");
            run(&Input::Raw(body)).unwrap();
        }
    }

    proptest! {
        #![proptest_config(config(64))]

        #[test]
        fn adjust_requests_never_fail_internally(input in input()) {
            run(&input)?;
        }
    }
}
