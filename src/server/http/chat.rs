//! The model's chat template (GGUF `tokenizer.chat_template`, a Jinja template as in Hugging
//! Face's `tokenizer_config.json`) rendered with minijinja: messages in, the prompt text out.

use minijinja::{context, Environment, Error, ErrorKind};

use super::api::Message;
use super::error::ApiError;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the texts of the model's BOS and EOS tokens,
    /// which templates refer to as `bos_token` and `eos_token`.
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        // Hugging Face templates call `raise_exception(msg)` to refuse a conversation.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())?;
        Ok(Self { env, bos, eos })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| {
            ApiError::internal(format!("the model's chat template is missing: {e}"))
        })?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| {
            ApiError::invalid(
                Some("messages"),
                format!("the model's chat template refused the messages: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_renders_with_the_generation_prompt() {
        let t = ChatTemplate::new(
            crate::model::testing::TINY_CHAT_TEMPLATE,
            String::new(),
            "<|im_end|>".into(),
        )
        .unwrap();
        let out = t
            .render(&[msg("system", "Be kind."), msg("user", "Hi")])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_a_400() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("user first"), "{}", err.message);
    }

    #[test]
    fn a_broken_template_fails_to_compile() {
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
    }
}
