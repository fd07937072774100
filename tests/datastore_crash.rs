//! A writer killed with SIGKILL at arbitrary moments of an import never leaves a store that
//! opens with partial or wrong contents: it opens with exactly the previous rows, or the
//! previous rows plus the complete new segment.

mod datastore_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use datastore_common::*;
use goodtriever::datastore::{Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::npy::{self, KeyArray, KeyMatrix};

const D: usize = 48;
const BASE: usize = 500;
const NEW: usize = 5_000;

fn import(dir: &Path, keys: &Path, values: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_goodtriever"));
    c.args([
        "datastore",
        "import",
        "--model-id",
        "test-model",
        "--key-type",
        "final_hidden",
    ])
    .arg("--keys")
    .arg(keys)
    .arg("--values")
    .arg(values)
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// The store holds exactly `BASE` or `BASE + NEW` rows and every row is the one written.
fn check_store(dir: &Path, base: &[f32], new: &[f32], new_vals: &[u32], base_vals: &[u32]) -> bool {
    let ds = Datastore::open(dir).expect("store must open after a crash");
    let committed = match ds.len() {
        BASE => false,
        n if n == BASE + NEW => true,
        n => panic!("store has {n} rows: neither {BASE} nor {}", BASE + NEW),
    };
    assert!(ds.verify().unwrap().is_ok(), "verify failed after a crash");
    // Probe rows of both parts: each must come back at distance 0 with its own value.
    let mut probes: Vec<(usize, &[f32], u32)> = (0..BASE)
        .step_by(97)
        .map(|r| (r, &base[r * D..(r + 1) * D], base_vals[r]))
        .collect();
    if committed {
        probes.extend(
            (0..NEW)
                .step_by(1777)
                .map(|r| (BASE + r, &new[r * D..(r + 1) * D], new_vals[r])),
        );
    }
    for (id, q, v) in probes {
        let q = as_stored(q, KeyDtype::F16);
        let r = ds.search(&q, 1, &SearchParams::exact()).unwrap();
        assert_eq!(
            (r[0][0].id, r[0][0].dist, r[0][0].value),
            (id as u64, 0.0, v)
        );
    }
    committed
}

#[test]
fn sigkill_during_import_leaves_the_previous_or_the_complete_new_store() {
    let tmp = tempfile::tempdir().unwrap();
    let base = clustered(BASE, D, 8, 1);
    let base_vals = values(BASE, 1);
    let new = clustered(NEW, D, 8, 2);
    let new_vals = values(NEW, 2);
    let kp = tmp.path().join("keys.npy");
    let vp = tmp.path().join("values.npy");
    npy::write_keys(
        &kp,
        &KeyMatrix {
            rows: NEW,
            dim: D,
            data: KeyArray::F32(new.clone()),
        },
    )
    .unwrap();
    let wide: Vec<i64> = new_vals.iter().map(|&v| v as i64).collect();
    npy::write_i64(&vp, NEW, 1, &wide).unwrap();

    let fresh = |name: &str| {
        let dir = tmp.path().join(name);
        let ds = create(&dir, D, KeyDtype::F16);
        ds.append(Keys::F32(&base), &base_vals, Provenance::new("base"))
            .unwrap();
        dir
    };

    // How long an undisturbed import takes, and that it succeeds.
    let dir = fresh("full");
    let t = Instant::now();
    let st = import(&dir, &kp, &vp).status().unwrap();
    let full = t.elapsed();
    assert!(st.success());
    assert!(check_store(&dir, &base, &new, &new_vals, &base_vals));

    // Kill at spread-out moments across (and a little beyond) that duration.
    let mut rng = Rng::new(42);
    let mut outcomes = (0, 0);
    for i in 0..7 {
        let dir = fresh(&format!("kill{i}"));
        // Spread over the import with jitter; the last one lands after it finished.
        let frac = if i == 6 {
            3.0
        } else {
            (i as f64 + rng.uniform() as f64) / 6.0
        };
        let delay = full.mul_f64(frac);
        let mut child = import(&dir, &kp, &vp).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL on Unix
        let _ = child.wait();
        if check_store(&dir, &base, &new, &new_vals, &base_vals) {
            outcomes.1 += 1;
        } else {
            outcomes.0 += 1;
        }
        // The lock died with the writer: a new import succeeds and leaves no garbage behind.
        let st = import(&dir, &kp, &vp).status().unwrap();
        assert!(st.success());
        let ds = Datastore::open(&dir).unwrap();
        assert!(ds.len() == BASE + NEW || ds.len() == BASE + 2 * NEW);
        let entries = std::fs::read_dir(dir.join("segments")).unwrap().count();
        assert_eq!(entries, ds.segments().len(), "garbage left in segments/");
    }
    eprintln!(
        "full import {full:?}; killed before commit {} times, after {}",
        outcomes.0, outcomes.1
    );
    assert!(
        outcomes.0 > 0,
        "no kill landed before the commit; the test proved nothing"
    );
}
