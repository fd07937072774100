//! The model's tokenizer, rebuilt from the GGUF metadata (`tokenizer.ggml.*`).
//!
//! A GGUF file carries its vocabulary, BPE merges and token types, so no separate
//! `tokenizer.json` is needed. candle's `TokenizerFromGguf` picks a pipeline that adds a prefix
//! space ("Hello" becomes "ĠHello"), which is wrong for SmolLM2 and shifts every hidden state
//! we store; this module builds the pipeline the model was trained with instead: byte-level BPE
//! over tokens + merges, pre-tokenised by splitting digits one by one and then ByteLevel
//! without a prefix space, a ByteLevel decoder, and the control tokens (token type 3) registered
//! as special tokens so that text such as `<|im_start|>` maps to its single id.
//!
//! Two entry points, because text plays two roles:
//! - [`Tokenizer::encode`] parses control tokens written in the text. It is for text that *we*
//!   or the user write for the model: generation prompts (chat templates need `<|im_start|>`),
//!   evaluation prompts, `model score`.
//! - [`Tokenizer::encode_plain`] treats the whole text as data: a tweet that contains the
//!   characters `<|im_end|>` or `<|endoftext|>` is tokenized as those characters, never as the
//!   control token. It is for corpus text going into a datastore (`datastore build`/`add`):
//!   otherwise such a document would store a fake EOS (or a chat marker) in the middle of a
//!   text. The EOS the builder puts *between* documents is inserted by id, not parsed.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use super::config::{get, number};
use super::ModelError;

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: u32 = 3;

/// A byte-level BPE tokenizer plus the ids the runtime needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with control-token matching switched off (`encode_special_tokens`).
    plain: tokenizers::Tokenizer,
    vocab_size: usize,
    special_ids: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    digest: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("special_tokens", &self.special_ids.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, ModelError> {
    let arr = get(md, key)?
        .to_vec()
        .map_err(|_| ModelError::Metadata(format!("{key} is not an array")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| ModelError::Metadata(format!("{key} holds a non-string: {v:?}")))
        })
        .collect()
}

/// Token ids of a text with each token's byte range in it
/// ([`Tokenizer::encode_plain_with_offsets`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainEncoding {
    /// The token ids, as [`Tokenizer::encode_plain`] gives them.
    pub ids: Vec<u32>,
    /// For each id, `(start, end)`: its bytes in the text (`(0, 0)` for a BOS put in front).
    pub offsets: Vec<(u32, u32)>,
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata. Only `tokenizer.ggml.model = gpt2` (byte-level
    /// BPE, what llama-3-style and SmolLM models use) is supported.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, ModelError> {
        let kind = get(md, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|_| ModelError::Metadata("tokenizer.ggml.model is not a string".into()))?;
        if kind != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model {kind:?}: only byte-level BPE (gpt2) tokenizers are supported"
            )));
        }
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let merges = strings(md, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Metadata(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| {
                    ModelError::Metadata("tokenizer.ggml.token_type is not an array".into())
                })?
                .iter()
                .map(|t| number(t).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))));
        let special_ids: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(i, _)| i as u32)
            .collect();
        let specials: Vec<AddedToken> = special_ids
            .iter()
            .map(|&i| AddedToken::from(tokens[i as usize].clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| ModelError::Tokenizer(format!("adding control tokens: {e}")))?;

        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);

        let mut h = Sha256::new();
        for t in &tokens {
            h.update(t.as_bytes());
            h.update([0u8]);
        }
        let digest = hex(&h.finalize());
        let id = |k: &str| md.get(k).and_then(number);
        Ok(Self {
            inner,
            plain,
            vocab_size: tokens.len(),
            special_ids,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            digest,
        })
    }

    /// Token ids of `text`, parsing control tokens: `<|im_start|>` written in the text becomes
    /// its id. For prompts (chat templates); a BOS token is put in front only when the model's
    /// metadata asks for it. Corpus text must use [`encode_plain`](Self::encode_plain).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(&self.inner, text)
    }

    /// Token ids of `text` as plain text: control-token strings in it (`<|endoftext|>`,
    /// `<|im_end|>`, ...) are tokenized as ordinary characters and never yield a control id.
    /// For corpus text (datastore building). A BOS token is put in front only when the model's
    /// metadata asks for it, as in [`encode`](Self::encode).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(&self.plain, text)
    }

    /// [`encode_plain`](Self::encode_plain) with each token's byte range in `text` (a BOS put
    /// in front gets the empty range `0..0`). For recording where datastore rows come from
    /// (docs/architecture.md §3); the ids are the same as `encode_plain`'s.
    pub fn encode_plain_with_offsets(&self, text: &str) -> Result<PlainEncoding, ModelError> {
        if text.len() > u32::MAX as usize {
            return Err(ModelError::Input(format!(
                "a text of {} bytes is longer than the {} a source offset can address",
                text.len(),
                u32::MAX
            )));
        }
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        let mut offsets = Vec::with_capacity(ids.capacity());
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
            offsets.push((0, 0));
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend(
            enc.get_offsets()
                .iter()
                .map(|&(a, b)| (a.min(text.len()) as u32, b.min(text.len()) as u32)),
        );
        Ok(PlainEncoding { ids, offsets })
    }

    fn encode_with(&self, tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = tok
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding: {e}")))?;
        let ids = enc.get_ids();
        match (self.add_bos, self.bos) {
            (true, Some(bos)) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Text of `ids`. With `skip_special`, control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} out of range (vocabulary {})",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(format!("decoding: {e}")))
    }

    /// The id of a token written exactly as in the vocabulary (e.g. `<|im_end|>`, `Ġthe`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Entries in `tokenizer.ggml.tokens`; every id the tokenizer produces is below it, and
    /// loading checks that it equals the model's logit count.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence token (`tokenizer.ggml.bos_token_id`), when the file names
    /// one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`), when the file names one:
    /// the stop token of generation and the document separator of datastore builds.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Ids of the control tokens (GGUF token type 3).
    pub fn special_token_ids(&self) -> &[u32] {
        &self.special_ids
    }

    /// SHA-256 (hex) of the vocabulary in id order, each token followed by a zero byte.
    pub fn vocab_digest(&self) -> &str {
        &self.digest
    }

    /// The underlying `tokenizers` instance, for callers that need its full API.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
