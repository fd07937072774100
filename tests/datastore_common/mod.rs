//! Shared helpers of the datastore integration tests: deterministic clustered data, a naive
//! brute-force reference, and byte snapshots of a directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use half::f16;

/// splitmix64: tiny, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `n` rows of dimension `d` drawn around `clusters` Gaussian centres (spread 4, noise 1),
/// the way hidden states cluster; HNSW recall on uniform noise says nothing.
pub fn clustered(n: usize, d: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let centres: Vec<f32> = (0..clusters * d).map(|_| 4.0 * rng.normal()).collect();
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let c = rng.below(clusters as u64) as usize;
        for j in 0..d {
            out.push(centres[c * d + j] + rng.normal());
        }
    }
    out
}

pub fn values(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 0xABCD);
    (0..n).map(|_| rng.below(49_152) as u32).collect()
}

/// Keys as the store holds them (rounded through f16 when the dtype is f16).
pub fn as_stored(keys: &[f32], dtype: KeyDtype) -> Vec<f32> {
    match dtype {
        KeyDtype::F32 => keys.to_vec(),
        KeyDtype::F16 => keys.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
    }
}

/// Brute force in f64: (squared distance, row) of the k nearest, ascending.
pub fn naive_knn(keys: &[f32], d: usize, q: &[f32], k: usize) -> Vec<(f64, u64)> {
    let mut all: Vec<(f64, u64)> = keys
        .chunks_exact(d)
        .enumerate()
        .map(|(i, row)| {
            let s: f64 = row
                .iter()
                .zip(q)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            (s, i as u64)
        })
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all
}

pub fn options(d: usize, dtype: KeyDtype) -> CreateOptions {
    CreateOptions {
        fingerprint: ModelFingerprint::named("test-model", d),
        key_type: KeyType::FinalHidden,
        dtype,
    }
}

pub fn create(dir: &Path, d: usize, dtype: KeyDtype) -> Datastore {
    Datastore::create(dir, options(d, dtype)).expect("create")
}

/// Every file under `dir` with its bytes (lock file excluded: taking a lock writes nothing,
/// but the file is created on first use).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), Vec::new());
                walk(root, &path, out);
            } else if e.file_name() != "LOCK" {
                out.insert(
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Copies a store directory (recursively), leaving out the writer's `LOCK` file.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
