//! `datastore info | segments | show | verify`: read a store without changing it — its
//! summary, its segments' provenance (what each was built from: the drift view), one row, and
//! a check of every file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use goodtriever::datastore::{Datastore, Provenance, SegmentInfo, TextProvenance};

use super::{open, open_any, print_json, printable, StoreArg};

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Row id among live rows, as searches return it (0-based).
    #[arg(long)]
    pub row: u64,
    /// Print the whole key, not only its summary.
    #[arg(long)]
    pub full: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn info(address: &str, json: bool) -> Result<()> {
    let ds = open_any(address)?;
    let segments = ds.segments();
    if json {
        let v = serde_json::json!({
            "dir": ds.location(),
            "fingerprint": ds.fingerprint(),
            "key_type": ds.key_type(),
            "dtype": ds.dtype(),
            "dim": ds.dim(),
            "rows": ds.len(),
            "segments": segments,
        });
        return print_json(&v);
    }
    println!("datastore  {}", ds.location());
    println!("model      {}", ds.fingerprint().model_id);
    println!("key type   {}", ds.key_type());
    println!("dtype      {}", ds.dtype());
    println!("dim        {}", ds.dim());
    println!("rows       {}", ds.len());
    println!("segments   {}", segments.len());
    for s in segments {
        println!(
            "  #{:<5} {:>10} rows {:>12} bytes{}{}  {}{}{}",
            s.id,
            s.rows,
            s.bytes,
            if s.retired { "  RETIRED" } else { "" },
            if s.sources { "  sources" } else { "" },
            printable(&s.provenance.source),
            s.provenance
                .label
                .as_ref()
                .map(|l| format!(" label={}", printable(l)))
                .unwrap_or_default(),
            s.provenance
                .tag
                .as_ref()
                .map(|t| format!(" tag={}", printable(t)))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

pub fn segments(a: StoreArg) -> Result<()> {
    let store = open_any(&a.store)?;
    let segs = store.segments();
    if a.json {
        return print_json(&segs);
    }
    println!(
        "{:>5}  {:>9}  {:>10}  {:<7}  {:<20}  {:<18}  {:<14}  source",
        "id", "rows", "first id", "state", "added (UTC)", "label", "tag"
    );
    for s in &segs {
        println!("{}", segment_line(s));
        for line in provenance_lines(&s.provenance) {
            println!("{:7}{line}", "");
        }
        if s.sources {
            println!(
                "{:7}sources: every row's position in a copy of its documents (explain shows them)",
                ""
            );
        }
    }
    let live: usize = segs.iter().filter(|s| !s.retired).map(|s| s.rows).sum();
    println!(
        "{} segment(s), {} live rows, {} retired segment(s)",
        segs.len(),
        live,
        segs.iter().filter(|s| s.retired).count()
    );
    Ok(())
}

fn segment_line(s: &SegmentInfo) -> String {
    format!(
        "{:>5}  {:>9}  {:>10}  {:<7}  {:<20}  {:<18}  {:<14}  {}",
        s.id,
        s.rows,
        s.first_id
            .map(|f| f.to_string())
            .unwrap_or_else(|| "-".into()),
        if s.retired { "retired" } else { "live" },
        utc(s.provenance.added_at),
        printable(s.provenance.label.as_deref().unwrap_or("-")),
        printable(s.provenance.tag.as_deref().unwrap_or("-")),
        printable(&s.provenance.source)
    )
}

/// The structured provenance under a segment's table line: the text record (files, field,
/// filter, windowing, counts), the tool, and for a compacted segment every original.
fn provenance_lines(p: &Provenance) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = &p.text {
        out.push(text_summary(t));
        for f in &t.files {
            out.push(format!(
                "file {} ({}, {} bytes, sha256 {}, {} of {} records selected)",
                f.path,
                f.format,
                f.bytes,
                f.sha256.get(..16).unwrap_or(&f.sha256),
                f.selected,
                f.records
            ));
        }
    }
    if let Some(tool) = &p.tool {
        out.push(format!("written by {tool}"));
    }
    if !p.merged_from.is_empty() {
        out.push(format!("merged from {} segment(s):", p.merged_from.len()));
        for m in &p.merged_from {
            let q = &m.provenance;
            out.push(format!(
                "  #{} rows {}..{}  added {}  label {}  tag {}  {}",
                m.id,
                m.first_row,
                m.first_row + m.rows as u64,
                utc(q.added_at),
                q.label.as_deref().unwrap_or("-"),
                q.tag.as_deref().unwrap_or("-"),
                q.source
            ));
            out.extend(q.text.iter().map(|t| format!("    {}", text_summary(t))));
        }
    }
    out
}

fn text_summary(t: &TextProvenance) -> String {
    format!(
        "text field {:?}, filter {}, window {} stride {}{}, {} document(s), {} tokens",
        t.text_field,
        t.label_filter
            .as_ref()
            .map(|f| f.to_string())
            .unwrap_or_else(|| "none".into()),
        t.window,
        t.stride,
        t.part
            .map(|p| format!(", part {}/{}", p.index, p.of))
            .unwrap_or_default(),
        t.documents,
        t.tokens
    )
}

/// `YYYY-MM-DD hh:mm:ss` of a Unix time (days-from-civil inverse, Howard Hinnant's algorithm).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Number of leading key components `show` prints without --full.
const SHOW_HEAD: usize = 8;

pub fn show(a: ShowArgs) -> Result<()> {
    let ds = open(&a.dir)?;
    let row = ds
        .row(a.row)
        .with_context(|| format!("cannot read row {} of {}", a.row, a.dir.display()))?;
    let seg = ds
        .segments()
        .into_iter()
        .find(|s| s.id == row.segment)
        .context("the row's segment is not listed (the store changed while reading)")?;
    let k = &row.key;
    let norm = k
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let mean = k.iter().map(|&x| f64::from(x)).sum::<f64>() / k.len().max(1) as f64;
    let min = k.iter().copied().fold(f32::INFINITY, f32::min);
    let max = k.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let head = &k[..k.len().min(SHOW_HEAD)];
    if a.json {
        let mut v = serde_json::json!({
            "dir": ds.dir(),
            "row": row.id,
            "live_rows": ds.len(),
            "segment": row.segment,
            "row_in_segment": row.row_in_segment,
            "value": row.value,
            "key_type": ds.key_type(),
            "dtype": ds.dtype(),
            "dim": k.len(),
            "key_summary": {"l2_norm": norm, "mean": mean, "min": min, "max": max, "head": head},
            "segment_provenance": seg.provenance,
        });
        if a.full {
            v["key"] = serde_json::json!(k);
        }
        return print_json(&v);
    }
    println!("row        {} of {} live rows", row.id, ds.len());
    println!(
        "segment    {} (row {} of its {}){}",
        row.segment,
        row.row_in_segment,
        seg.rows,
        seg.provenance
            .tag
            .as_ref()
            .map(|t| format!(", tag {}", printable(t)))
            .unwrap_or_default()
    );
    println!("source     {}", printable(&seg.provenance.source));
    println!("value      {} (next token id)", row.value);
    println!(
        "key        {} x {} {}: l2 norm {norm:.4}, mean {mean:.4}, min {min:.4}, max {max:.4}",
        k.len(),
        ds.dtype(),
        ds.key_type()
    );
    let fmt = |xs: &[f32]| {
        xs.iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if a.full {
        println!("key values [{}]", fmt(k));
    } else {
        println!(
            "key head   [{}{}]  (--full prints all {})",
            fmt(head),
            if k.len() > head.len() { ", ..." } else { "" },
            k.len()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The datastore: a directory, or a Milvus store `milvus://HOST:PORT/COLLECTION`.
    #[arg(value_name = "DIR|URL")]
    pub store: String,
    /// For a Milvus store: the local store it was pushed from; sampled rows are compared with
    /// it (value, segment, every key component), and its rows and segments with the copy's.
    #[arg(long, value_name = "DIR")]
    pub against: Option<PathBuf>,
    /// For a Milvus store: rows read back and checked, spread evenly over the store.
    #[arg(long, default_value_t = 256)]
    pub sample: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    if goodtriever::store_address::is_remote(&a.store) {
        return verify_remote(&a);
    }
    if a.against.is_some() {
        bail!(
            "--against compares a Milvus store with its source; {} is a directory",
            a.store
        );
    }
    verify_dir(Path::new(&a.store), a.json)
}

#[cfg(feature = "milvus")]
fn verify_remote(a: &VerifyArgs) -> Result<()> {
    use goodtriever::milvus::{verify_milvus, MilvusStore};
    let store = MilvusStore::open(&a.store)
        .with_context(|| format!("cannot open datastore {}", a.store))?;
    let source = a.against.as_deref().map(open).transpose()?;
    let report = verify_milvus(&store, source.as_ref(), a.sample)
        .with_context(|| format!("cannot verify datastore {}", a.store))?;
    if a.json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} rows in {} segments of {} ({} counted by Milvus, {} uncommitted above them), {} rows sampled{}",
            report.rows,
            report.segments,
            report.address,
            report.counted_rows,
            report.uncommitted_rows,
            report.sampled_rows,
            report.source.as_ref().map(|s| format!(" against {s}")).unwrap_or_default()
        );
    }
    if !report.is_ok() {
        bail!(
            "{} problem(s) in {}:\n  {}",
            report.problems.len(),
            report.address,
            report.problems.join("\n  ")
        );
    }
    if !a.json {
        println!("ok");
    }
    Ok(())
}

#[cfg(not(feature = "milvus"))]
fn verify_remote(a: &VerifyArgs) -> Result<()> {
    // The same error opening it anywhere else gives.
    super::open_any(&a.store).map(|_| ())
}

fn verify_dir(dir: &Path, json: bool) -> Result<()> {
    // Not through `open`: a store with a damaged segment refuses to open, and this command is
    // how an operator finds every damaged file.
    let report = Datastore::verify_dir(dir)
        .with_context(|| format!("cannot verify datastore {}", dir.display()))?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} files of {} segments ({} live rows)",
            report.files.len(),
            report.segments,
            report.live_rows
        );
    }
    if !report.is_ok() {
        let lines: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{} problem(s) in {}:\n  {}",
            lines.len(),
            dir.display(),
            lines.join("\n  ")
        );
    }
    if !json {
        println!("ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_700_000_000), "2023-11-14 22:13:20");
    }
}
