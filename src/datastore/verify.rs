//! `verify`: read every byte of every segment and check it against the manifest.
//!
//! Opening only checks sizes (cheap, keeps mmap lazy). Verification is the slow, thorough
//! check an operator runs after copying a store or suspecting a disk: CRC-32 of every file of
//! every segment (retired ones too, since `unretire` may bring them back), the structure of each
//! HNSW index, and that all keys are finite. It reports every problem, each naming its file,
//! rather than stopping at the first.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::DatastoreError;
use super::manifest::Manifest;
use super::segment::{segment_dir, Segment};

/// One file that was checked.
#[derive(Clone, Debug, Serialize)]
pub struct FileCheck {
    /// The file, under the store's `segments/` directory.
    pub path: PathBuf,
    /// Its size as the manifest records it, in bytes.
    pub bytes: u64,
    /// Whether it could be read and its size and CRC-32 match the manifest.
    pub ok: bool,
}

/// One problem found, with the file it concerns.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyProblem {
    /// The file (or, for a problem with no single file, the segment's directory).
    pub path: PathBuf,
    /// What is wrong, in words for an operator.
    pub detail: String,
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.detail)
    }
}

/// Result of [`Datastore::verify`](super::Datastore::verify).
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Segments checked, retired ones included.
    pub segments: usize,
    /// Rows in the live segments, as the manifest counts them.
    pub live_rows: usize,
    /// Every file of every segment, in manifest order, whether it passed or not.
    pub files: Vec<FileCheck>,
    /// Every problem found; empty for a sound store.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(self)` when nothing is wrong, else the first problem as a typed error.
    pub fn into_result(self) -> Result<Self, DatastoreError> {
        match self.problems.first() {
            None => Ok(self),
            Some(p) => Err(DatastoreError::Corrupt {
                path: p.path.clone(),
                detail: if self.problems.len() > 1 {
                    format!(
                        "{} (and {} more problems)",
                        p.detail,
                        self.problems.len() - 1
                    )
                } else {
                    p.detail.clone()
                },
            }),
        }
    }
}

fn crc_file(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, h.finalize()))
}

pub fn verify(dir: &Path, manifest: &Manifest) -> VerifyReport {
    let mut report = VerifyReport {
        segments: manifest.segments.len(),
        live_rows: manifest.live().map(|s| s.rows).sum(),
        files: Vec::new(),
        problems: Vec::new(),
    };
    for seg in &manifest.segments {
        let sdir = segment_dir(dir, seg.id);
        let mut files_ok = true;
        for f in &seg.files {
            let path = sdir.join(&f.name);
            let problem = |detail: String| VerifyProblem {
                path: path.clone(),
                detail,
            };
            let outcome = match crc_file(&path) {
                Err(e) => Some(problem(format!("cannot read: {e}"))),
                Ok((bytes, _)) if bytes != f.bytes => Some(problem(format!(
                    "size is {bytes} bytes, the manifest says {}",
                    f.bytes
                ))),
                Ok((_, crc)) if crc != f.crc32 => Some(problem(format!(
                    "checksum mismatch: crc32 is {crc:08x}, the manifest says {:08x}",
                    f.crc32
                ))),
                Ok(_) => None,
            };
            report.files.push(FileCheck {
                path: path.clone(),
                bytes: f.bytes,
                ok: outcome.is_none(),
            });
            if let Some(p) = outcome {
                files_ok = false;
                report.problems.push(p);
            }
        }
        if !files_ok {
            continue;
        }
        match Segment::open(dir, seg, manifest.dim(), manifest.dtype) {
            Err(DatastoreError::Corrupt { path, detail }) => {
                report.problems.push(VerifyProblem { path, detail })
            }
            Err(e) => report.problems.push(VerifyProblem {
                path: sdir.clone(),
                detail: e.to_string(),
            }),
            Ok(s) => {
                if let Some(i) = s.keys().first_non_finite() {
                    report.problems.push(VerifyProblem {
                        path: sdir.join(super::segment::KEYS_FILE),
                        detail: format!(
                            "row {} column {} is not finite",
                            i / manifest.dim(),
                            i % manifest.dim()
                        ),
                    });
                }
                // A value outside the vocabulary would fail every step whose neighbours
                // include its row, long after the store was written.
                if let Some(vocab) = manifest.fingerprint.vocab_size {
                    if let Some(row) = s.values().iter().position(|&v| v as usize >= vocab) {
                        report.problems.push(VerifyProblem {
                            path: sdir.join(super::segment::VALUES_FILE),
                            detail: format!(
                                "row {row} holds token id {}, outside the vocabulary of {vocab} tokens",
                                s.values()[row]
                            ),
                        });
                    }
                }
            }
        }
    }
    report
}
