//! A choice's text as its tokens arrive: incremental detokenization and stop sequences.
//!
//! Each new token re-decodes the choice's tokens (byte-level BPE decodes a prefix of tokens to
//! a prefix of the text, except for a character whose bytes are split across tokens, which
//! shows as U+FFFD until its last byte arrives). Text is released only when it can no longer
//! change: never an incomplete character, and never the start of a possible stop sequence,
//! so a stream never shows text that the stop sequence then takes back.

use crate::model::{ModelError, Tokenizer};

/// Why a choice ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or a stop sequence.
    Stop,
    /// `max_tokens`.
    Length,
}

impl Finish {
    /// `finish_reason` as OpenAI writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One choice's tokens and the text released so far.
#[derive(Debug, Default)]
pub struct ChoiceText {
    tokens: Vec<u32>,
    text: String,
    released: usize,
    /// Set when the choice ended.
    pub finish: Option<Finish>,
    /// Tokens generated, the stop token included (the usage's `completion_tokens`).
    pub generated: usize,
}

impl ChoiceText {
    /// The text released so far.
    pub fn text(&self) -> &str {
        &self.text[..self.released]
    }

    /// Adds a generated token (`stop_token`: it is a stop token, counted but not text) and
    /// returns the text it releases. A matched stop sequence ends the choice (`finish`), with
    /// the text cut before it.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        stop_token: bool,
        stops: &[String],
    ) -> Result<String, ModelError> {
        self.generated += 1;
        if self.finish.is_some() || stop_token {
            return Ok(String::new());
        }
        self.tokens.push(token);
        self.text = tok.decode(&self.tokens, false)?;
        let from = self.released;
        if let Some(cut) = find_stop(&self.text, from, stops) {
            self.text.truncate(cut);
            self.finish = Some(Finish::Stop);
            return Ok(self.release(self.text.len()));
        }
        let mut upto = self.text.len() - held_back(&self.text, stops);
        if self.text[..upto].ends_with('\u{FFFD}') {
            upto -= '\u{FFFD}'.len_utf8();
        }
        Ok(self.release(upto))
    }

    /// Ends the choice for `finish`, releasing the text still held back.
    pub fn end(&mut self, finish: Finish) -> String {
        if self.finish.is_some() {
            return String::new();
        }
        self.finish = Some(finish);
        self.release(self.text.len())
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.released || !self.text.is_char_boundary(self.released) {
            return String::new();
        }
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }
}

/// The earliest position of a stop sequence in `text`, looking only where one could start
/// after the first `from` bytes were released.
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let mut start = from.saturating_sub(s.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            text[start..].find(s.as_str()).map(|p| start + p)
        })
        .min()
}

/// How many bytes at the end of `text` are the start of some stop sequence.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            s.char_indices()
                .skip(1)
                .map(|(i, _)| i)
                .filter(|&i| text.ends_with(&s[..i]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_and_hold_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\nxy", 0, &stops), Some(3));
        assert_eq!(find_stop("abcENxy", 0, &stops), None);
        assert_eq!(find_stop("xENDyEND", 5, &stops), Some(5));
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("éE", &["Ez".to_string()]), 1);
    }
}
