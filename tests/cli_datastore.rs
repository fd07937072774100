//! The datastore commands as a user types them: `import`, `info`, `search`, `retire`,
//! `unretire`, `compact` and `verify` on the real binary, their `--json` output read back, and
//! the refusals (an unknown segment, a damaged file) that must change nothing and exit non-zero.

use std::path::Path;
use std::process::{Command, Output};

use goodtriever::npy;
use serde_json::Value;

const D: usize = 8;

/// Runs `goodtriever` with the words of `line` as arguments (the test's names have no spaces)
/// in `dir`.
fn goodtriever(line: &str, dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_goodtriever"))
        .args(line.split_whitespace())
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs a command that must succeed and returns its stdout parsed as JSON.
fn json(line: &str, dir: &Path) -> Value {
    let out = goodtriever(line, dir);
    assert!(
        out.status.success(),
        "{line} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{line}: not JSON ({e}): {:?}", out.stdout))
}

/// Deterministic keys in [-1, 1) and token ids.
fn rows(n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let keys = (0..n * D)
        .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    let values = (0..n).map(|_| (next() % 50) as i64).collect();
    (keys, values)
}

fn write_rows(dir: &Path, name: &str, keys: &[f32], values: &[i64]) {
    let n = values.len();
    npy::write_f32(&dir.join(format!("{name}_keys.npy")), n, D, keys).unwrap();
    npy::write_i64(&dir.join(format!("{name}_values.npy")), n, 1, values).unwrap();
}

/// The nearest neighbour of each query: (id, squared distance).
fn nearest(dir: &Path, queries: &[f32]) -> Vec<(i64, f32)> {
    npy::write_f32(&dir.join("q.npy"), queries.len() / D, D, queries).unwrap();
    json(
        "datastore search st --queries q.npy --k 2 --exact --out-ids ids.npy --out-dists d.npy --json",
        dir,
    );
    let ids: Vec<i64> = npyz::NpyFile::new(std::fs::File::open(dir.join("ids.npy")).unwrap())
        .unwrap()
        .into_vec()
        .unwrap();
    let dists: Vec<f32> = npyz::NpyFile::new(std::fs::File::open(dir.join("d.npy")).unwrap())
        .unwrap()
        .into_vec()
        .unwrap();
    ids.chunks(2)
        .zip(dists.chunks(2))
        .map(|(i, d)| (i[0], d[0]))
        .collect()
}

#[test]
fn import_info_search_retire_compact_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k1, v1) = rows(200, 1);
    let (k2, v2) = rows(100, 2);
    write_rows(dir, "a", &k1, &v1);
    write_rows(dir, "b", &k2, &v2);

    let first = json(
        "datastore import --keys a_keys.npy --values a_values.npy --model-id cli-test --dtype f32 --label a --json st",
        dir,
    );
    assert_eq!(first["rows"], 200);
    let second = json(
        "datastore import --keys b_keys.npy --values b_values.npy --label b --tag drift --json st",
        dir,
    );
    assert_eq!(
        (second["rows"].as_u64(), second["first_id"].as_u64()),
        (Some(100), Some(200))
    );
    let seg2 = second["id"].as_u64().unwrap().to_string();

    let info = json("datastore info --json st", dir);
    assert_eq!(info["rows"], 300);
    assert_eq!(info["dim"], D);
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["fingerprint"]["model_id"], "cli-test");
    let segments = info["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[1]["provenance"]["tag"], "drift");

    // Rows of both segments are found at distance 0 under their global ids.
    let probe: Vec<f32> = [&k1[5 * D..6 * D], &k2[50 * D..51 * D]].concat();
    assert_eq!(nearest(dir, &probe), vec![(5, 0.0), (250, 0.0)]);

    // An unknown segment is refused and changes nothing.
    let refused = goodtriever("datastore retire st 99", dir);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no segment 99"));
    assert_eq!(json("datastore info --json st", dir), info);

    // Retired rows leave the search; unretired they are back.
    let retired = json(&format!("datastore retire --json st {seg2}"), dir);
    assert_eq!(retired["retired"], true);
    assert_eq!(json("datastore info --json st", dir)["rows"], 200);
    let found = nearest(dir, &probe);
    assert_eq!(found[0], (5, 0.0));
    assert!(found[1].0 < 200 && found[1].1 > 0.0, "{found:?}");
    json(&format!("datastore unretire --json st {seg2}"), dir);
    assert_eq!(nearest(dir, &probe), vec![(5, 0.0), (250, 0.0)]);

    // Compaction drops the retired segment and keeps every live row.
    json(&format!("datastore retire --json st {seg2}"), dir);
    let merged = json("datastore compact --json st", dir);
    assert_eq!(merged["rows"], 200);
    let info = json("datastore info --json st", dir);
    assert_eq!(info["segments"].as_array().unwrap().len(), 1);
    assert_eq!(info["rows"], 200);
    assert_eq!(nearest(dir, &k1[5 * D..6 * D])[0], (5, 0.0));
    assert_eq!(json("datastore compact --json st", dir), Value::Null);

    // verify: clean, then one flipped byte in the keys is found and named.
    let report = json("datastore verify --json st", dir);
    assert_eq!(
        report["problems"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    let seg = info["segments"][0]["id"].as_u64().unwrap();
    let keys = dir.join(format!("st/segments/{seg}/keys.bin"));
    let mut bytes = std::fs::read(&keys).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&keys, bytes).unwrap();
    let damaged = goodtriever("datastore verify --json st", dir);
    assert!(!damaged.status.success());
    let report: Value = serde_json::from_slice(&damaged.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{report}");
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert!(
        stderr.contains("problem") && stderr.contains("keys.bin"),
        "{stderr}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k, mut v) = rows(20, 3);
    v[5] = 60_000;
    write_rows(dir, "bad", &k, &v);
    let out = goodtriever(
        "datastore import --keys bad_keys.npy --values bad_values.npy --vocab-size 49152 st",
        dir,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 5") && err.contains("60000") && err.contains("49152"),
        "{err}"
    );
    assert!(
        !dir.join("st").exists(),
        "a refused import created the store"
    );

    // A good import records the vocabulary; a later bad one is refused against it.
    let (k2, v2) = rows(20, 4);
    write_rows(dir, "good", &k2, &v2);
    json(
        "datastore import --keys good_keys.npy --values good_values.npy --vocab-size 49152 --json st",
        dir,
    );
    let out = goodtriever(
        "datastore import --keys bad_keys.npy --values bad_values.npy st",
        dir,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(json("datastore info --json st", dir)["rows"], 20);
}

#[test]
fn a_queries_file_of_zero_rows_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k, v) = rows(20, 5);
    write_rows(dir, "a", &k, &v);
    json(
        "datastore import --keys a_keys.npy --values a_values.npy --json st",
        dir,
    );
    npy::write_f32(&dir.join("empty.npy"), 0, D, &[]).unwrap();
    let out = goodtriever(
        "datastore search st --queries empty.npy --k 2 --out-ids i.npy --out-dists d.npy",
        dir,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no rows"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn printing_into_a_closed_pipe_stops_quietly_without_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k, v) = rows(20, 7);
    write_rows(dir, "a", &k, &v);
    json(
        "datastore import --keys a_keys.npy --values a_values.npy --json st",
        dir,
    );
    for line in [
        "datastore info st",
        "datastore info --json st",
        "datastore segments st",
    ] {
        // The reader is gone before the command writes anything, as with `| head -0`.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_goodtriever"))
            .args(line.split_whitespace())
            .current_dir(dir)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{line}: {err}");
        assert!(err.is_empty(), "{line}: {err}");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(13), "{line}: {:?}", out.status);
    }
}

#[test]
fn provenance_is_printed_with_its_control_characters_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (k, v) = rows(20, 9);
    write_rows(dir, "a", &k, &v);
    json(
        "datastore import --keys a_keys.npy --values a_values.npy --tag plain --json st",
        dir,
    );
    // A store written before appends checked provenance could hold anything.
    let path = dir.join("st/manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["segments"][0]["provenance"]["tag"] = "\u{1b}[2Jgone\nfake line".into();
    m.as_object_mut().unwrap().remove("crc32"); // nor did its manifest carry a checksum
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    for line in ["datastore segments st", "datastore info st"] {
        let out = goodtriever(line, dir);
        assert!(out.status.success(), "{line}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            !text.contains('\u{1b}'),
            "{line}: raw escape printed: {text:?}"
        );
        assert!(
            text.contains("\\u{1b}[2Jgone\\nfake line"),
            "{line}: {text}"
        );
    }
}

/// `goodtriever` with `GOODTRIEVER_SIMD` set.
fn with_simd(line: &str, dir: &Path, simd: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_goodtriever"))
        .args(line.split_whitespace())
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("GOODTRIEVER_SIMD", simd)
        .output()
        .unwrap()
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    npyz::NpyFile::new(std::fs::File::open(path).unwrap())
        .unwrap()
        .into_vec()
        .unwrap()
}

#[test]
fn every_kernel_build_finds_the_same_neighbours_and_a_bad_cap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 100 wide: 32-scalar blocks, an 8-scalar step and a tail in every distance; f16 keys.
    const W: usize = 100;
    let (n, queries) = (300, 6);
    let keys = rows(n * W / D, 3).0;
    let values = rows(n, 4).1;
    npy::write_f32(&dir.join("k.npy"), n, W, &keys).unwrap();
    npy::write_i64(&dir.join("v.npy"), n, 1, &values).unwrap();
    npy::write_f32(&dir.join("q.npy"), queries, W, &rows(queries * W / D, 5).0).unwrap();
    json(
        "datastore import --keys k.npy --values v.npy --model-id simd --dtype f16 --json st",
        dir,
    );
    let search = "datastore search st --queries q.npy --k 10 --exact --out-ids ids.npy --out-dists d.npy --json";
    let mut answers = Vec::new();
    for simd in ["scalar", "avx2", "avx512", "auto"] {
        let out = with_simd(search, dir, simd);
        if !out.status.success() {
            // Only a build this CPU lacks may be refused, and it must say so.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                simd != "scalar"
                    && simd != "auto"
                    && err.contains("asks for kernels this CPU lacks"),
                "{simd}: {err}"
            );
            continue;
        }
        let ids: Vec<i64> = read_npy(&dir.join("ids.npy"));
        let dists: Vec<f32> = read_npy(&dir.join("d.npy"));
        answers.push((simd, ids, dists));
    }
    let (_, scalar_ids, scalar_dists) = &answers[0];
    for (simd, ids, dists) in &answers[1..] {
        assert_eq!(ids, scalar_ids, "{simd}");
        for (a, b) in dists.iter().zip(scalar_dists) {
            assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{simd}: {a} vs {b}");
        }
    }
    // The SIMD builds agree to the bit (and `auto` is one of them).
    let simd: Vec<_> = answers.iter().filter(|a| a.0 != "scalar").collect();
    for pair in simd.windows(2) {
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&pair[0].2),
            bits(&pair[1].2),
            "{} vs {}",
            pair[0].0,
            pair[1].0
        );
    }

    // A cap that names no build is refused before anything runs: a compaction that would merge
    // two segments changes nothing.
    json(
        "datastore import --keys k.npy --values v.npy --json st",
        dir,
    );
    let before = json("datastore info --json st", dir);
    assert_eq!(before["segments"].as_array().unwrap().len(), 2);
    let bad = with_simd("datastore compact --json st", dir, "sse9");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("GOODTRIEVER_SIMD=\"sse9\" is not a kernel"),
        "{err}"
    );
    assert_eq!(json("datastore info --json st", dir), before);
}
