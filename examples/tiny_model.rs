//! Writes the tiny random llama of `goodtriever::model::testing` (with its ChatML chat
//! template) to a GGUF file, for tests outside Rust that need a model and must not download
//! one: the Python client's tests of the HTTP API start `goodtriever serve --model` on it.
//!
//! `cargo run --example tiny_model -- OUT.gguf [CONTEXT]` (`cargo test` builds it too).

use goodtriever::model::testing::{write_tiny_llama, TinySpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: tiny_model OUT.gguf [CONTEXT]  (writes the tiny test model)");
        std::process::exit(2);
    };
    let context = match args.next() {
        Some(c) => c.parse()?,
        None => 2048,
    };
    let spec = TinySpec {
        context,
        ..TinySpec::default()
    };
    write_tiny_llama(out.as_ref(), &spec)?;
    println!("{out}");
    Ok(())
}
