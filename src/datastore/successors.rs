//! The rows that follow earlier neighbours in their source text, for reusing one decoding
//! step's neighbours at the next (docs/architecture.md §1.6).
//!
//! Row `r` of a segment built from text pairs the hidden state at some position of a document
//! with the token after it, and the builder writes a document's positions as consecutive rows.
//! So when the model has just emitted the token that row `r` predicted, row `r + 1` (the same
//! document one position on) is where a full search is likely to land next; RetoMaton (Alon et
//! al. 2022) follows these pointers instead of searching. Only rows of the same segment are
//! followed, and of the same document where the segment records sources. A segment without
//! sources may pair a document's last row with the next document's first; the caller's
//! distance test, not this module, rejects such rows, which is why every successor comes back
//! with its exact distance to the new query.

use super::{Datastore, Neighbour};

impl Datastore {
    /// Appends to `out` the successor of every neighbour in `prev` whose value is `token`,
    /// each with its exact squared L2 distance to `query` (in `prev`'s order; the caller
    /// sorts). `prev` holds ids as a search of the current snapshot returns them; an id
    /// beyond it (the store was compacted since) is passed over. Allocates nothing once `out`
    /// has grown.
    pub fn successors_into(
        &self,
        prev: &[Neighbour],
        token: u32,
        query: &[f32],
        out: &mut Vec<Neighbour>,
    ) {
        let snap = self.snap.load();
        for n in prev.iter().filter(|n| n.value == token) {
            if n.id >= snap.rows as u64 {
                continue;
            }
            // `starts` is ascending; the segment is the last one starting at or before `id`.
            let s = snap.starts.partition_point(|&st| st <= n.id) - 1;
            let seg = &snap.segments[s];
            let r = (n.id - snap.starts[s]) as usize;
            if r + 1 >= seg.rows {
                continue;
            }
            if let Some(src) = seg.sources() {
                if src.span(r).document != src.span(r + 1).document {
                    continue;
                }
            }
            out.push(Neighbour {
                id: n.id + 1,
                value: seg.values()[r + 1],
                dist: seg.keys().dist(query, r + 1),
            });
        }
    }
}
