//! Compiles `proto/goodtriever/v1/*.proto` into the gRPC service and messages with protox (a
//! pure-Rust protobuf compiler), so building the crate needs no system `protoc`. The file
//! descriptor set is kept too: the server offers it through gRPC reflection. Only the `server`
//! feature needs them; the core builds without the protobuf toolchain.

#[cfg(not(feature = "server"))]
fn main() {}

#[cfg(feature = "server")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::path::PathBuf;

    let protos = ["proto/goodtriever/v1/goodtriever.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("goodtriever_descriptor.bin"),
        protox::prost::Message::encode_to_vec(&fds),
    )?;
    // `bytes` fields as `bytes::Bytes`: decoding slices the received buffer instead of copying
    // every tensor into a new vector (a dense request's logits are ~200 KB).
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
