//! Text → datastore rows for `AddTexts`: the one place the server runs a language model.
//!
//! The service sees the model only through [`TextEncoder`], so the gRPC plumbing (auth, limits,
//! appends, refresh) is tested with a tiny deterministic encoder, and the real llama runtime
//! ([`crate::model::Model`]) plugs in behind the same trait when the server is started with
//! `--model`.

use crate::fingerprint::{KeyType, ModelFingerprint};
#[cfg(feature = "model")]
use crate::model::{Model, ModelError};

/// Sliding-window length used to key texts: long enough for real left context, short enough
/// that a window's attention stays cheap on CPU.
pub const WINDOW: usize = 512;
/// Windows start every `STRIDE` tokens; each position is keyed once, with the most context.
pub const STRIDE: usize = 256;
/// Windows computed together in one forward pass.
pub const BATCH: usize = 4;

/// Why a text could not be turned into rows.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The input itself is unusable (e.g. a text too short to yield a key).
    #[error("{0}")]
    Input(String),
    /// The model failed (an encoder's own error, boxed: the server does not depend on which
    /// runtime the encoder uses).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
}

#[cfg(feature = "model")]
impl From<ModelError> for EncodeError {
    fn from(e: ModelError) -> Self {
        EncodeError::Model(Box::new(e))
    }
}

/// What [`TextEncoder::encode`] calls per keyed position: `(key, next token, span)`.
pub type PairSink<'a> = dyn FnMut(&[f32], u32, Option<(u32, u32)>) + 'a;

/// Something that turns text into `(key hidden state, next token)` pairs.
pub trait TextEncoder: Send + Sync {
    /// The model the keys come from; checked against the stores at startup.
    fn fingerprint(&self) -> ModelFingerprint;

    /// Calls `on_pair(key, next_token, span)` for every keyed position of `text`, in order;
    /// `span` is the byte range in `text` of the token at the position, when the encoder
    /// knows it (it becomes the row's source, docs/architecture.md §3).
    fn encode(
        &self,
        text: &str,
        key_type: KeyType,
        on_pair: &mut PairSink<'_>,
    ) -> Result<(), EncodeError>;

    /// The text of token `id`, for explanations; `None` when the encoder cannot say.
    fn token_text(&self, _id: u32) -> Option<String> {
        None
    }
}

#[cfg(feature = "model")]
impl TextEncoder for Model {
    fn fingerprint(&self) -> ModelFingerprint {
        Model::fingerprint(self)
    }

    fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer().decode(&[id], false).ok()
    }

    fn encode(
        &self,
        text: &str,
        key_type: KeyType,
        on_pair: &mut PairSink<'_>,
    ) -> Result<(), EncodeError> {
        // Texts added to a store are data: a literal `<|im_end|>` in them is plain text, as in
        // `datastore build` (see `Tokenizer::encode_plain`).
        let enc = self.tokenizer().encode_plain_with_offsets(text)?;
        let (tokens, offsets) = (enc.ids, enc.offsets);
        if tokens.len() < 3 {
            // The first position of a window is never keyed (attention sink) and the last has
            // no next token, so fewer than three tokens yield nothing.
            return Err(EncodeError::Input(format!(
                "text {:?} has {} tokens; at least 3 are needed to produce a datastore row",
                truncate(text, 40),
                tokens.len()
            )));
        }
        let window = WINDOW.min(self.config().context_length);
        let stride = STRIDE.min(window / 2).max(1);
        // encode_pairs emits the window plan's positions in order.
        let positions: Vec<usize> = crate::model::Windows::plan(tokens.len(), window, stride)?
            .iter()
            .flat_map(|w| w.first_keyed..w.last_keyed)
            .collect();
        let mut j = 0usize;
        self.encode_pairs(&tokens, window, stride, key_type, BATCH, |k, t| {
            let span = positions.get(j).map(|&p| offsets[p]);
            j += 1;
            on_pair(k, t, span)
        })?;
        Ok(())
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
