//! Which SIMD kernels this process runs: detected once from the CPU, optionally capped by the
//! operator.
//!
//! The hand-written kernels (key distances in `datastore::distance`, the quantised dot products
//! of the model runtime) come in up to three builds: portable scalar code, AVX2 (+ FMA, F16C)
//! and AVX-512 (F, BW, VL, DQ and VNNI). The machines this runs on change from one day to the
//! next, so one binary carries all of them and picks the best the CPU has, once per process
//! (docs/architecture.md §4, "Kernels"). `GOODTRIEVER_SIMD=avx2` (or `scalar`) caps the
//! choice: an A/B of two builds in one run on one box, or a way round a CPU whose wide path
//! misbehaves.
//!
//! The AVX-512 kernels sum in exactly the AVX2 kernels' order (each 512-bit accumulator holds two
//! of the AVX2 build's 256-bit ones), so both give bit-identical results: a store answers the
//! same neighbours on either kind of machine, and the tests check that equality.

use std::sync::OnceLock;

/// The variable that caps the kernel choice.
pub const SIMD_ENV: &str = "GOODTRIEVER_SIMD";

/// A build of the kernels, from the most portable to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// Portable Rust, for any CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL, DQ and VNNI (as well as AVX2, FMA and F16C).
    Avx512,
}

/// A value of [`SIMD_ENV`] that names no kernel, or one this CPU cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimdError {
    /// Not one of the names.
    #[error("{SIMD_ENV}={0:?} is not a kernel: use auto, avx512, avx2 or scalar")]
    Unknown(String),
    /// A kernel wider than the CPU's.
    #[error("{SIMD_ENV}={asked} asks for kernels this CPU lacks (it has {has})")]
    Unsupported {
        /// What was asked.
        asked: Simd,
        /// The widest the CPU runs.
        has: Simd,
    },
}

impl Simd {
    /// Every build, narrowest first.
    pub const ALL: [Simd; 3] = [Simd::Scalar, Simd::Avx2, Simd::Avx512];

    /// The name used by [`SIMD_ENV`] and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the build.
    pub fn supported(self) -> bool {
        self <= detected()
    }

    /// Reads a [`SIMD_ENV`] value: `None` for `auto` (or empty).
    pub fn parse(value: &str) -> Result<Option<Simd>, SimdError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "scalar" => Ok(Some(Simd::Scalar)),
            "avx2" => Ok(Some(Simd::Avx2)),
            "avx512" => Ok(Some(Simd::Avx512)),
            _ => Err(SimdError::Unknown(value.to_string())),
        }
    }
}

impl std::fmt::Display for Simd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest build this CPU runs, whatever [`SIMD_ENV`] says.
pub fn detected() -> Simd {
    static DETECTED: OnceLock<Simd> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Simd {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    let avx512 = has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vl")
        && has!("avx512dq")
        && has!("avx512vnni");
    match (avx2, avx512) {
        (true, true) => Simd::Avx512,
        (true, false) => Simd::Avx2,
        _ => Simd::Scalar,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Simd {
    Simd::Scalar
}

/// The build the kernels use in this process: [`detected`], capped by [`SIMD_ENV`].
///
/// Decided on first use and fixed from then on, so that every distance of a search comes from
/// one build. A bad value of the variable is reported by [`from_env`] (the CLI checks it at
/// start); here it is logged and ignored.
#[inline]
pub fn active() -> Simd {
    static ACTIVE: OnceLock<Simd> = OnceLock::new();
    *ACTIVE.get_or_init(|| match from_env() {
        Ok(level) => level,
        Err(e) => {
            tracing::warn!("{e}; using {}", detected());
            detected()
        }
    })
}

/// The build [`SIMD_ENV`] asks for on this CPU, or why it cannot be had.
pub fn from_env() -> Result<Simd, SimdError> {
    let value = std::env::var(SIMD_ENV).unwrap_or_default();
    resolve(Simd::parse(&value)?, detected())
}

fn resolve(asked: Option<Simd>, has: Simd) -> Result<Simd, SimdError> {
    match asked {
        None => Ok(has),
        Some(asked) if asked <= has => Ok(asked),
        Some(asked) => Err(SimdError::Unsupported { asked, has }),
    }
}

/// The builds this CPU runs, narrowest first (the tests compare each with the others).
pub fn supported() -> impl Iterator<Item = Simd> {
    Simd::ALL.into_iter().filter(|s| s.supported())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for s in Simd::ALL {
            assert_eq!(Simd::parse(s.name()), Ok(Some(s)));
        }
        assert_eq!(Simd::parse(" AVX2 "), Ok(Some(Simd::Avx2)));
        assert_eq!(Simd::parse("auto"), Ok(None));
        assert_eq!(Simd::parse(""), Ok(None));
        let e = Simd::parse("sse9").unwrap_err();
        assert!(
            e.to_string().contains("auto, avx512, avx2 or scalar"),
            "{e}"
        );
    }

    #[test]
    fn a_cap_never_exceeds_the_cpu() {
        assert_eq!(resolve(None, Simd::Avx2), Ok(Simd::Avx2));
        assert_eq!(resolve(Some(Simd::Scalar), Simd::Avx512), Ok(Simd::Scalar));
        assert_eq!(resolve(Some(Simd::Avx512), Simd::Avx512), Ok(Simd::Avx512));
        let e = resolve(Some(Simd::Avx512), Simd::Avx2).unwrap_err();
        assert_eq!(
            e,
            SimdError::Unsupported {
                asked: Simd::Avx512,
                has: Simd::Avx2
            }
        );
        assert!(e.to_string().contains("it has avx2"), "{e}");
    }

    #[test]
    fn the_active_build_is_one_the_cpu_runs() {
        assert!(active().supported());
        assert!(supported().any(|s| s == Simd::Scalar));
        assert!(supported().all(|s| s <= detected()));
    }
}
