//! `serve --tls-cert --tls-key`: a client that trusts the certificate is served as over plain
//! TCP; a plain-text client or one that trusts another authority is refused without disturbing
//! it; certificate and key files that do not make a TLS identity are refused before anything is
//! served, with a message that names the flags.

mod server_support;

use goodtriever::detox::DetoxScratch;
use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient, Tensor};
use goodtriever::server::{convert, GrpcAddr, ServeOptions, Server, ServerError, TlsPem};
use server_support::*;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A fresh self-signed certificate for localhost and 127.0.0.1, and its key, in PEM.
fn self_signed() -> TlsPem {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    TlsPem {
        cert: c.cert.pem().into_bytes(),
        key: c.signing_key.serialize_pem().into_bytes(),
    }
}

fn tls_options(tls: TlsPem) -> ServeOptions {
    ServeOptions {
        tls: Some(tls),
        ..ServeOptions::default()
    }
}

async fn tls_channel(addr: std::net::SocketAddr, trusted: &[u8]) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trusted))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn request(q: &[f32]) -> proto::AdjustRequest {
    proto::AdjustRequest {
        hidden: Some(Tensor {
            data: f32_bytes(q).into(),
            dtype: proto::DType::F32 as i32,
            rows: 1,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trusts_the_certificate_is_served_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let identity = self_signed();
    let cert = identity.cert.clone();
    let served = start(engine(dir.path(), defaults()), tls_options(identity)).await;
    let reference = engine(&dir.path().join("reference"), defaults());

    let mut client = GoodtrieverClient::new(tls_channel(served.addr, &cert).await.unwrap());
    let info = client
        .info(proto::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model.unwrap().hidden_size as usize, DIM);

    // The same answers as the engine in-process, unary and streamed.
    let mut rng = Rng::new(11);
    let queries: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(DIM, 3.0)).collect();
    let want: Vec<_> = queries
        .iter()
        .map(|q| {
            let mut rows = Vec::new();
            reference
                .adjust_sparse(
                    q,
                    reference.defaults(),
                    &mut DetoxScratch::default(),
                    &mut rows,
                )
                .unwrap();
            rows.pop().unwrap()
        })
        .collect();
    let unary = client
        .adjust(request(&queries[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        convert::sparse_row_from_proto(&unary.rows[0]).unwrap(),
        want[0]
    );
    let steps: Vec<_> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| proto::AdjustRequest {
            step: i as u64,
            ..request(q)
        })
        .collect();
    let mut answers = client
        .adjust_stream(tokio_stream::iter(steps))
        .await
        .unwrap()
        .into_inner();
    for (i, w) in want.iter().enumerate() {
        let a = answers
            .message()
            .await
            .unwrap()
            .expect("an answer per step");
        assert_eq!(a.step, i as u64);
        assert_eq!(&convert::sparse_row_from_proto(&a.rows[0]).unwrap(), w);
    }

    // A plain-text client gets no service. What it sees depends on when the server's TLS
    // alert reaches it (a reset, or the alert read as a bad HTTP/2 frame), so only that it fails
    // is checked.
    if let Ok(channel) = GrpcAddr::Tcp(served.addr).connect().await {
        GoodtrieverClient::new(channel)
            .info(proto::InfoRequest {})
            .await
            .expect_err("plain text refused");
    }
    // A client that trusts another authority refuses the server's certificate.
    let stranger = self_signed().cert;
    match tls_channel(served.addr, &stranger).await {
        Err(e) => assert!(e.contains("InvalidCertificate"), "{e}"),
        Ok(channel) => {
            let err = GoodtrieverClient::new(channel)
                .info(proto::InfoRequest {})
                .await
                .expect_err("an untrusted certificate is refused");
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        }
    }

    // Neither disturbed the server or its trusted client.
    let again = client
        .adjust(request(&queries[1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        convert::sparse_row_from_proto(&again.rows[0]).unwrap(),
        want[1]
    );
    served.stop().await;
}

#[tokio::test]
async fn tls_material_that_makes_no_identity_is_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let good = self_signed();
    let other = self_signed();
    // What each case is, and the flag its message must name.
    let cases = [
        (
            "a certificate file that holds no certificate",
            "--tls-cert",
            TlsPem {
                cert: b"not a certificate\n".to_vec(),
                key: good.key.clone(),
            },
        ),
        (
            "a key file that holds no key",
            "--tls-key",
            TlsPem {
                cert: good.cert.clone(),
                key: b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
                    .to_vec(),
            },
        ),
        (
            "the certificate given as the key",
            "--tls-key",
            TlsPem {
                cert: good.cert.clone(),
                key: good.cert.clone(),
            },
        ),
        (
            "a key that is not the certificate's",
            "the key the certificate's?",
            TlsPem {
                cert: good.cert.clone(),
                key: other.key.clone(),
            },
        ),
    ];
    let engine = engine(dir.path(), defaults());
    for (what, names, tls) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        match Server::from_listeners(engine.clone(), tls_options(tls), listener, None) {
            Err(e @ ServerError::Tls(_)) => {
                let text = e.to_string();
                assert!(text.contains(names), "{what}: {text}");
                assert!(!text.ends_with("transport error"), "{what}: {text}");
            }
            Err(e) => panic!("{what}: refused for another reason: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    // The good pair is accepted.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(Server::from_listeners(engine, tls_options(good), listener, None).is_ok());
}

#[tokio::test]
async fn plain_text_on_a_non_loopback_address_needs_the_operators_consent() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    // The unspecified address listens on every interface: not loopback. Nothing connects.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    match Server::from_listeners(engine.clone(), ServeOptions::default(), listener, None) {
        Err(e @ ServerError::PlaintextRemote(_)) => {
            let text = e.to_string();
            assert!(
                text.contains("--tls-cert") && text.contains("--allow-plaintext"),
                "{text}"
            );
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("plain text on 0.0.0.0 was accepted without consent"),
    }
    // With TLS, or with the explicit consent, it is accepted; loopback never needs either.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    assert!(
        Server::from_listeners(engine.clone(), tls_options(self_signed()), listener, None).is_ok()
    );
    let consent = ServeOptions {
        allow_plaintext_remote: true,
        ..ServeOptions::default()
    };
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    assert!(Server::from_listeners(engine.clone(), consent, listener, None).is_ok());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(Server::from_listeners(engine, ServeOptions::default(), listener, None).is_ok());
}
