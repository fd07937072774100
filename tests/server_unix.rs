//! `serve --addr unix:PATH`: the same service over a Unix domain socket, a stale socket file
//! from a crashed server replaced, a live server's socket or a regular file left alone, and the
//! socket file removed when the server stops.

mod server_support;

use std::path::Path;

use goodtriever::detox::DetoxScratch;
use goodtriever::server::convert;
use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient, Tensor};
use goodtriever::server::{GrpcAddr, ServeOptions, Server};
use server_support::*;

async fn bind(dir: &Path, addr: &GrpcAddr) -> Result<Server, goodtriever::server::ServerError> {
    Server::bind(engine(dir, defaults()), ServeOptions::default(), addr, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_a_unix_socket_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let addr: GrpcAddr = format!("unix:{}", sock.display()).parse().unwrap();

    // A socket file left by a server that died without cleaning up.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());

    let server = bind(dir.path(), &addr)
        .await
        .expect("stale socket replaced");
    assert_eq!(server.grpc_endpoint(), Some(addr.clone()));
    assert_eq!(server.grpc_addr(), None);
    let engine = engine(&dir.path().join("copy"), defaults());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // A second server on the same path is refused while the first one listens.
    let err = bind(&dir.path().join("second"), &addr)
        .await
        .err()
        .expect("live socket refused");
    assert!(err.to_string().contains("another server"), "{err}");

    let mut client = GoodtrieverClient::new(addr.connect().await.unwrap());
    let info = client
        .info(proto::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model.unwrap().hidden_size as usize, DIM);

    let q = Rng::new(7).vec(DIM, 3.0);
    let answer = client
        .adjust(proto::AdjustRequest {
            hidden: Some(Tensor {
                data: f32_bytes(&q).into(),
                dtype: proto::DType::F32 as i32,
                rows: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut want = Vec::new();
    engine
        .adjust_sparse(
            &q,
            engine.defaults(),
            &mut DetoxScratch::default(),
            &mut want,
        )
        .unwrap();
    assert_eq!(
        convert::sparse_row_from_proto(&answer.rows[0]).unwrap(),
        want[0]
    );

    drop(client);
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
    assert!(!sock.exists(), "the socket file is removed on stop");

    // A server bound but never run (say, its startup failed later) removes its file too.
    let other = dir.path().join("other.sock");
    let server = bind(&dir.path().join("third"), &GrpcAddr::Unix(other.clone()))
        .await
        .unwrap();
    assert!(other.exists());
    drop(server);
    assert!(!other.exists(), "the socket file is removed on drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let addr: GrpcAddr = format!("unix:{}", file.display()).parse().unwrap();
    let err = bind(dir.path(), &addr)
        .await
        .err()
        .expect("regular file refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}
