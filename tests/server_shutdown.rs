//! SIGTERM while clients are writing: the real `goodtriever serve` binary must finish the
//! in-flight appends, exit cleanly, and every `AddExamples` it acknowledged must be on disk.

mod server_support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use goodtriever::datastore::Datastore;
use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient, Tensor};
use server_support::*;
use tonic::Request;

const TOKEN: &str = "shutdown-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_writes_loses_no_acknowledged_add() {
    let dir = tempfile::tempdir().unwrap();
    make_store(&dir.path().join("toxic"), 300, 1);
    make_store(&dir.path().join("nontoxic"), 300, 2);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_goodtriever"))
        .arg("serve")
        .arg("--toxic")
        .arg(dir.path().join("toxic"))
        .arg("--nontoxic")
        .arg(dir.path().join("nontoxic"))
        .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--admin-token-file")
        .arg(&token_file)
        .args(["--k", "32"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = read_listening_addr(&mut child);

    // Writers append until the server goes away, recording what was acknowledged.
    let acked: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let acked = acked.clone();
        let addr = addr.clone();
        writers.push(tokio::spawn(async move {
            let mut client = GoodtrieverClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let mut rng = Rng::new(1000 + w);
            for n in 0.. {
                let rows = 400;
                let store = if n % 2 == 0 { "toxic" } else { "nontoxic" };
                let mut req = Request::new(proto::AddExamplesRequest {
                    store: store.into(),
                    hidden: Some(Tensor {
                        data: f32_bytes(&rng.vec(rows * DIM, 3.0)).into(),
                        dtype: proto::DType::F32 as i32,
                        rows: rows as u32,
                    }),
                    next_tokens: (0..rows as u32).map(|i| i % VOCAB as u32).collect(),
                    source: format!("writer-{w}"),
                    tag: format!("{w}-{n}"),
                });
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
                match client.add_examples(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        acked
                            .lock()
                            .unwrap()
                            .push((store.to_string(), r.segment_id, r.rows_added));
                    }
                    Err(_) => return,
                }
            }
        }));
    }

    // Let writes flow, then SIGTERM while they are still coming.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 6 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !acked.lock().unwrap().is_empty(),
        "no write was acknowledged"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writers stop once the server is gone")
            .unwrap();
    }
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "serve exited with {exit}");

    // Every acknowledged append is on disk, with its rows.
    let acked = acked.lock().unwrap().clone();
    for name in ["toxic", "nontoxic"] {
        let store = Datastore::open(&dir.path().join(name)).unwrap();
        let segments = store.segments();
        let mut acked_rows = 0;
        for (_, id, rows) in acked.iter().filter(|a| a.0 == name) {
            let seg = segments
                .iter()
                .find(|s| s.id == *id)
                .unwrap_or_else(|| panic!("acknowledged segment {id} of {name} is missing"));
            assert_eq!(seg.rows as u64, *rows);
            assert!(!seg.retired);
            acked_rows += rows;
        }
        assert!(store.len() as u64 >= 300 + acked_rows);
    }
}
