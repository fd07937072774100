//! Turning text into datastore entries: (key hidden state at position i, token i + 1).
//!
//! Long token streams are cut into sliding windows (`window` tokens, starting every `stride`
//! tokens) so that every key is computed with up to `window` tokens of left context and the
//! cost stays linear. Each position is keyed exactly once, by the first window that covers it
//! with the most context available at that point, and the first position of every window is
//! never keyed: its hidden state is a near-constant "attention sink" that would crowd out real
//! neighbours in the store. Windows are run `batch` at a time (left-padded when lengths
//! differ) with the LM head skipped, and pairs are handed to a callback as they are produced,
//! so memory does not grow with the input.

use super::llama::{ForwardOutput, Outputs};
use super::{Model, ModelError};
use crate::fingerprint::KeyType;

/// One window of the plan: tokens `begin..end` are run, and positions `first_keyed..last_keyed`
/// (exclusive end) are emitted, each paired with the token that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// First token of the window, an index into the stream.
    pub begin: usize,
    /// One past its last token; at most `begin + window`.
    pub end: usize,
    /// First position keyed, above `begin` (a window's first position is never keyed) and
    /// past every position an earlier window keyed.
    pub first_keyed: usize,
    /// One past the last position keyed; below the stream's last token, which has no next
    /// token to pair with.
    pub last_keyed: usize,
}

impl Windows {
    /// The windows for a stream of `n` tokens. `stride` must be in `1..=window`, `window ≥ 2`.
    pub fn plan(n: usize, window: usize, stride: usize) -> Result<Vec<Windows>, ModelError> {
        if window < 2 || stride == 0 || stride > window {
            return Err(ModelError::Input(format!(
                "window {window} and stride {stride}: need window ≥ 2 and 1 ≤ stride ≤ window"
            )));
        }
        let mut plan = Vec::new();
        if n < 2 {
            return Ok(plan);
        }
        let (mut begin, mut covered) = (0, 0);
        loop {
            let end = (begin + window).min(n);
            let lo = (begin + 1).max(covered);
            let hi = end.min(n - 1);
            if lo < hi {
                plan.push(Windows {
                    begin,
                    end,
                    first_keyed: lo,
                    last_keyed: hi,
                });
            }
            covered = covered.max(hi);
            if end == n || covered >= n - 1 {
                break;
            }
            begin += stride;
        }
        Ok(plan)
    }
}

impl Model {
    /// Runs `tokens` through the model in sliding windows and calls `on_pair(key, next_token)`
    /// for every keyed position, in stream order. `key` has `hidden_size` values of
    /// `key_type`. `batch` windows are computed together.
    pub fn encode_pairs(
        &self,
        tokens: &[u32],
        window: usize,
        stride: usize,
        key_type: KeyType,
        batch: usize,
        mut on_pair: impl FnMut(&[f32], u32),
    ) -> Result<(), ModelError> {
        if batch == 0 {
            return Err(ModelError::Input("batch must be at least 1".into()));
        }
        if window > self.config().context_length {
            return Err(ModelError::Input(format!(
                "window {window} exceeds the model's context of {}",
                self.config().context_length
            )));
        }
        let plan = Windows::plan(tokens.len(), window, stride)?;
        let mut out = ForwardOutput::default();
        let mut cache = self.new_cache(batch);
        for group in plan.chunks(batch) {
            let rows: Vec<&[u32]> = group.iter().map(|w| &tokens[w.begin..w.end]).collect();
            let (flat, pad) = self.pad_left(&rows);
            if cache.batch() != group.len() {
                cache = self.new_cache(group.len());
            }
            cache.clear();
            cache.set_left_padding(&pad)?;
            self.forward_into(
                &flat,
                group.len(),
                &mut cache,
                Outputs::keys_only(key_type),
                &mut out,
            )?;
            for (r, w) in group.iter().enumerate() {
                for i in w.first_keyed..w.last_keyed {
                    on_pair(out.key_at(r, pad[r] + i - w.begin), tokens[i + 1]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(n: usize, window: usize, stride: usize) -> Vec<usize> {
        Windows::plan(n, window, stride)
            .unwrap()
            .iter()
            .flat_map(|w| w.first_keyed..w.last_keyed)
            .collect()
    }

    #[test]
    fn every_position_but_window_starts_is_keyed_once_in_order() {
        // Overlapping windows: everything except position 0 (the stream's sink).
        assert_eq!(keyed(10, 4, 2), (1..9).collect::<Vec<_>>());
        assert_eq!(keyed(100, 16, 5), (1..99).collect::<Vec<_>>());
        // Disjoint windows lose each window's first position.
        assert_eq!(keyed(10, 4, 4), vec![1, 2, 3, 5, 6, 7]);
        assert!(keyed(1, 4, 2).is_empty());
        assert!(keyed(2, 4, 2).is_empty());
        assert_eq!(keyed(3, 4, 2), vec![1]);
    }

    #[test]
    fn windows_stay_within_the_stream_and_the_window() {
        for (n, w, s) in [(7, 3, 1), (50, 8, 3), (9, 9, 9), (33, 32, 16)] {
            for win in Windows::plan(n, w, s).unwrap() {
                assert!(win.end <= n && win.end - win.begin <= w);
                assert!(win.first_keyed > win.begin && win.last_keyed < n);
                assert!(win.last_keyed <= win.end);
            }
        }
    }

    #[test]
    fn bad_window_parameters_are_refused() {
        assert!(Windows::plan(10, 1, 1).is_err());
        assert!(Windows::plan(10, 4, 0).is_err());
        assert!(Windows::plan(10, 4, 5).is_err());
    }
}
