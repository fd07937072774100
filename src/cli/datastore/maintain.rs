//! `datastore retire | unretire | compact`: change which segments a store searches, and
//! reclaim the space of those it no longer does.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{open, print_segment, progress_bar, DirArgs};

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Segment id (see `datastore info`).
    pub segment: u64,
    /// Print the segment as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn retire(a: SegmentArgs) -> Result<()> {
    let s = open(&a.dir)?.retire(a.segment)?;
    print_segment(&s, a.json, "retired")
}

pub fn unretire(a: SegmentArgs) -> Result<()> {
    let s = open(&a.dir)?.unretire(a.segment)?;
    print_segment(&s, a.json, "unretired")
}

pub fn compact(a: DirArgs) -> Result<()> {
    let ds = open(&a.dir)?;
    let bar = progress_bar(ds.len() as u64, "indexing");
    let r = ds.compact_with_progress(&|n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    match r {
        Some(s) => print_segment(&s, a.json, "compacted into"),
        None => {
            if a.json {
                println!("null");
            } else {
                println!("nothing to compact");
            }
            Ok(())
        }
    }
}
