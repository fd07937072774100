//! A running reader for the add-to-visible benchmark (scripts/bench/bench_build.py): opens a
//! datastore, then polls `refresh` until rows appear, and searches for one of the new rows
//! until it comes back as its own nearest neighbour. Prints one JSON line with the Unix time
//! (seconds) at which the new rows became searchable and what the refresh and search cost.
//!
//! Usage: cargo bench --bench add_latency_reader -- STORE [POLL_MS]
//! It prints `ready` on stderr once the store is open, so a script can start the add then.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use goodtriever::datastore::{Datastore, SearchParams};

mod driver_args;

/// The script that runs this driver.
const SCRIPT: &str = "scripts/bench/bench_build.py";

fn newest_row(dir: &Path, d: usize) -> anyhow::Result<Vec<f32>> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let seg = m["segments"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .rev()
                .find(|s| !s["retired"].as_bool().unwrap_or(false))
        })
        .ok_or_else(|| anyhow::anyhow!("no live segment"))?;
    let path: PathBuf = dir
        .join("segments")
        .join(seg["id"].as_u64().unwrap_or(0).to_string())
        .join("keys.bin");
    let bytes = std::fs::read(path)?;
    Ok(if m["dtype"] == "f16" {
        bytes[..2 * d]
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    } else {
        bytes[..4 * d]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn main() -> anyhow::Result<()> {
    const USAGE: &str = "usage: add_latency_reader STORE [POLL_MS]";
    let mut args = driver_args::args("add_latency_reader", SCRIPT)
        .into_iter()
        .skip(1)
        .peekable();
    if matches!(args.peek().map(String::as_str), Some("-h" | "--help")) {
        println!("{USAGE}\n\nOpens STORE, polls `refresh` every POLL_MS (default 20) until");
        println!("new rows appear, and prints one JSON line: when they became searchable.");
        return Ok(());
    }
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(USAGE))?);
    let poll = Duration::from_millis(args.next().map(|s| s.parse()).transpose()?.unwrap_or(20));
    let ds = Datastore::open(&dir)?;
    let rows0 = ds.len();
    // Warm the existing segments' maps and indexes as a serving process would have.
    let warm = vec![0.0f32; ds.dim()];
    ds.search(&warm, 8, &SearchParams::default())?;
    eprintln!("ready: {rows0} rows");
    loop {
        let t = Instant::now();
        let changed = ds.refresh()?;
        let refresh_ms = t.elapsed().as_secs_f64() * 1e3;
        if changed && ds.len() > rows0 {
            let q = newest_row(&dir, ds.dim())?;
            let t = Instant::now();
            let hits = ds.search(&q, 8, &SearchParams::default())?;
            let search_ms = t.elapsed().as_secs_f64() * 1e3;
            let found = hits[0]
                .first()
                .is_some_and(|n| n.dist == 0.0 && n.id >= rows0 as u64);
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "visible_at": now, "rows_before": rows0, "rows_after": ds.len(),
                    "refresh_ms": refresh_ms, "search_ms": search_ms, "found_new_row": found,
                })
            );
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}
