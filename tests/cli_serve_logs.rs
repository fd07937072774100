//! `--log-format json`: every line `goodtriever serve` writes to stderr is one JSON object
//! whose fields a log collector can index (where it listens, what was appended, that it
//! stopped), and a failure to start is one such line too.

mod server_support;

use std::io::Read;
use std::process::{Command, Stdio};

use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient, Tensor};
use serde_json::Value;
use server_support::*;
use tonic::Request;

const TOKEN: &str = "log-test-token";

fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

fn event<'a>(events: &'a [Value], message: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} event in {events:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_one_json_object_per_line_with_fields() {
    let dir = tempfile::tempdir().unwrap();
    make_store(&dir.path().join("toxic"), 300, 1);
    make_store(&dir.path().join("nontoxic"), 300, 2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_goodtriever"))
        .args(["--log-format", "json", "-v", "serve", "--toxic"])
        .arg(dir.path().join("toxic"))
        .arg("--nontoxic")
        .arg(dir.path().join("nontoxic"))
        .args(["--addr", "127.0.0.1:0", "--no-metrics", "--k", "32"])
        .env("GOODTRIEVER_ADMIN_TOKEN", TOKEN)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = read_listening_addr(&mut child);

    let mut client = GoodtrieverClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let rows = 7;
    let mut req = Request::new(proto::AddExamplesRequest {
        store: "toxic".into(),
        hidden: Some(Tensor {
            data: f32_bytes(&Rng::new(5).vec(rows * DIM, 3.0)).into(),
            dtype: proto::DType::F32 as i32,
            rows: rows as u32,
        }),
        next_tokens: vec![3; rows],
        source: "log-test".into(),
        tag: String::new(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let added = client.add_examples(req).await.unwrap().into_inner();
    drop(client);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().unwrap().success());

    let events = json_lines(&stderr);
    let listening = event(&events, "gRPC server listening");
    assert_eq!(listening["addr"], addr.as_str());
    assert_eq!(listening["tls"], false);
    assert_eq!(listening["level"], "INFO");
    let appended = event(&events, "appended");
    assert_eq!(appended["store"], "toxic");
    assert_eq!(appended["rows"], rows as u64);
    assert_eq!(appended["segment"], added.segment_id);
    event(&events, "server stopped");
}

#[test]
fn a_failure_to_start_is_a_json_line_too() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-store-here");
    let out = Command::new(env!("CARGO_BIN_EXE_goodtriever"))
        .args(["--log-format", "json", "serve", "--toxic"])
        .arg(&missing)
        .arg("--nontoxic")
        .arg(&missing)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let events = json_lines(&String::from_utf8(out.stderr).unwrap());
    let last = events.last().expect("the error is logged");
    assert_eq!(last["level"], "ERROR");
    let error = last["error"].as_str().unwrap();
    assert!(error.contains(&*missing.to_string_lossy()), "{error}");
}
