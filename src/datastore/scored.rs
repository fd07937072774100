//! The (distance, row) pair that every search in the datastore ranks: the exact scan's top-k
//! buffer, the HNSW walk's candidate and result heaps, and the repair passes' walk.

use std::cmp::Ordering;

/// A (squared L2 distance, row) pair ordered by distance with [`f32::total_cmp`], then by row:
/// a total order, so results are deterministic when distances tie. Equality is that order's
/// (so `-0.0` and `0.0` differ, and a NaN equals the same NaN), consistent with `Ord` as the
/// heaps and `select_nth_unstable` need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scored(pub(crate) f32, pub(crate) u32);

impl PartialEq for Scored {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_first_then_row_with_total_cmp() {
        let mut v = [
            Scored(1.0, 3),
            Scored(f32::NAN, 0),
            Scored(0.0, 2),
            Scored(-0.0, 9),
            Scored(1.0, 1),
            Scored(f32::INFINITY, 0),
        ];
        v.sort_unstable();
        let got: Vec<(u32, u32)> = v.iter().map(|s| (s.0.to_bits(), s.1)).collect();
        let want: Vec<(u32, u32)> = [
            (-0.0f32, 9),
            (0.0, 2),
            (1.0, 1),
            (1.0, 3),
            (f32::INFINITY, 0),
            (f32::NAN, 0),
        ]
        .iter()
        .map(|&(d, r)| (d.to_bits(), r))
        .collect();
        assert_eq!(got, want);
        assert_ne!(Scored(0.0, 1), Scored(-0.0, 1));
        assert_eq!(Scored(f32::NAN, 1), Scored(f32::NAN, 1));
        assert!(Scored(2.0, 0) > Scored(1.0, 7));
    }
}
