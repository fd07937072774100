//! The command line of a measurement driver (the `[[bench]]` targets in this folder, which
//! the scripts in scripts/bench/ run).

/// The arguments (program name first) without the `--bench` that `cargo bench` appends, as
/// in `cargo bench --bench NAME -- ARGS`.
///
/// A plain `cargo bench` (or `cargo test --all-targets`) runs every bench target with no
/// arguments of its own; a driver has nothing to measure then, so it says what it is and
/// exits successfully instead of failing that run.
pub fn args(name: &str, script: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() <= 1 {
        eprintln!(
            "{name}: a measurement driver for {script}, not a benchmark of its own; \
             nothing to run without arguments (`cargo bench --bench {name} -- --help`)"
        );
        std::process::exit(0);
    }
    args
}
