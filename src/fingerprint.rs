//! What a datastore was built from: the model and the place in it that produced the keys.
//!
//! A key is only comparable with keys produced by the same model at the same point of its
//! forward pass. Every datastore records a [`ModelFingerprint`] and a [`KeyType`]; stores and
//! queries that disagree are refused instead of silently returning meaningless neighbours.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which hidden state of the language model is used as the retrieval key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// The normalised input of the last block's MLP (the output of the last layer's
    /// post-attention RMSNorm). The paper's choice.
    LastFfnInput,
    /// The output of the final norm, i.e. the input of the LM head. What most engines export.
    FinalHidden,
}

impl KeyType {
    /// Every key type, in the order messages list them.
    pub const ALL: [KeyType; 2] = [KeyType::LastFfnInput, KeyType::FinalHidden];

    /// The snake_case name used in manifests, on the command line and on the wire; the inverse
    /// of its `FromStr`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::LastFfnInput => "last_ffn_input",
            KeyType::FinalHidden => "final_hidden",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown key type name.
#[derive(Debug, thiserror::Error)]
#[error("unknown key type {0:?}: expected one of last_ffn_input, final_hidden")]
pub struct UnknownKeyType(pub String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKeyType(s.to_string()))
    }
}

/// Identifies the model whose hidden states a datastore holds.
///
/// `model_id` and `hidden_size` are always known. The digests and the vocabulary size are known
/// when the store was built by running the model; a store imported from another engine's dump
/// may lack them, and then only the fields both sides know are compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// A human-readable name, e.g. `SmolLM2-135M-Instruct`.
    pub model_id: String,
    /// Architecture as the model file states it, e.g. `llama`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The width of the hidden states, and so the key dimension.
    pub hidden_size: usize,
    /// Tokens in the model's vocabulary: the length of a row of logits, and the bound on
    /// stored values. `None` for stores imported without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// SHA-256 (hex) of the tokenizer vocabulary, in id order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_digest: Option<String>,
    /// SHA-256 (hex) of one weight tensor's raw bytes, to tell fine-tunes apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_digest: Option<String>,
}

impl ModelFingerprint {
    /// A fingerprint that knows only a name and a hidden size (imports from other engines).
    pub fn named(model_id: impl Into<String>, hidden_size: usize) -> Self {
        Self {
            model_id: model_id.into(),
            architecture: None,
            hidden_size,
            vocab_size: None,
            tokenizer_digest: None,
            weight_digest: None,
        }
    }

    /// A sentence saying why the vocabulary size cannot be a store's, if it cannot: 0 tokens,
    /// or more than [`crate::limits::MAX_VOCAB`].
    pub fn vocab_problem(&self) -> Option<String> {
        match self.vocab_size {
            Some(0) => Some("vocabulary size is 0".into()),
            Some(v) if v > crate::limits::MAX_VOCAB => Some(format!(
                "vocabulary size {v} is above the largest supported, {}",
                crate::limits::MAX_VOCAB
            )),
            _ => None,
        }
    }

    /// Checks that keys described by `other` may be mixed with or searched against keys
    /// described by `self`. Returns a sentence naming the first field that differs.
    pub fn check_compatible(&self, other: &ModelFingerprint) -> Result<(), String> {
        if self.hidden_size != other.hidden_size {
            return Err(format!(
                "hidden size differs: {} here, {} there",
                self.hidden_size, other.hidden_size
            ));
        }
        if self.model_id != other.model_id {
            return Err(format!(
                "model id differs: {:?} here, {:?} there",
                self.model_id, other.model_id
            ));
        }
        fn both<T: PartialEq + fmt::Debug>(
            what: &str,
            a: &Option<T>,
            b: &Option<T>,
        ) -> Result<(), String> {
            match (a, b) {
                (Some(a), Some(b)) if a != b => {
                    Err(format!("{what} differs: {a:?} here, {b:?} there"))
                }
                _ => Ok(()),
            }
        }
        both("architecture", &self.architecture, &other.architecture)?;
        both("vocabulary size", &self.vocab_size, &other.vocab_size)?;
        both(
            "tokenizer digest",
            &self.tokenizer_digest,
            &other.tokenizer_digest,
        )?;
        both("weight digest", &self.weight_digest, &other.weight_digest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_round_trips_through_its_name() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert!("last_layer".parse::<KeyType>().is_err());
    }

    #[test]
    fn fingerprints_compare_only_known_fields() {
        let full = ModelFingerprint {
            model_id: "m".into(),
            architecture: Some("llama".into()),
            hidden_size: 8,
            vocab_size: Some(100),
            tokenizer_digest: Some("aa".into()),
            weight_digest: Some("bb".into()),
        };
        let named = ModelFingerprint::named("m", 8);
        assert!(full.check_compatible(&named).is_ok());
        assert!(named.check_compatible(&full).is_ok());
        let err = full
            .check_compatible(&ModelFingerprint::named("m", 16))
            .unwrap_err();
        assert!(err.contains("hidden size"), "{err}");
        let mut other = full.clone();
        other.weight_digest = Some("cc".into());
        assert!(full
            .check_compatible(&other)
            .unwrap_err()
            .contains("weight digest"));
    }
}
