//! The Milvus store backend against a real Milvus server (docs/architecture.md §3, "Milvus").
//!
//! Start one with `scripts/milvus.sh start` and run
//! `GOODTRIEVER_MILVUS=127.0.0.1:19530 cargo test --features milvus --test milvus_store`.
//! Without `GOODTRIEVER_MILVUS` the tests that need the server say so and pass; with
//! `GOODTRIEVER_REQUIRE_MILVUS=1` (CI) they fail instead. The restart tests kill the server
//! (SIGKILL of its process group: a crash) and start it again on its data through
//! `scripts/milvus.sh`, and run only with `GOODTRIEVER_MILVUS_RESTART=1` (required too under
//! `GOODTRIEVER_REQUIRE_MILVUS=1`); they hold a lock that keeps every other test of this file
//! off the server meanwhile. One of them serves gRPC in this process over Milvus-backed stores.
#![cfg(feature = "milvus")]

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use goodtriever::datastore::{
    CreateOptions, Datastore, DatastoreError, KeyDtype, Keys, Neighbour, Provenance, SearchParams,
};
use goodtriever::detox::{AdjustOptions, ControlStore, DetoxError, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::milvus::{push, verify_milvus, MilvusStore, PushOptions};
use goodtriever::rule::{Mode, RuleParams, SparseRow};
use goodtriever::store::Store;
use goodtriever::store_address::open_store;

#[path = "datastore_common/mod.rs"]
mod common;
#[path = "server_support/mod.rs"]
mod server_support;

const DIM: usize = 32;
const VOCAB: usize = 49_152;

/// Normal tests share the server (read); restart tests take it alone (write).
static SERVER: RwLock<()> = RwLock::new(());

fn required() -> bool {
    std::env::var("GOODTRIEVER_REQUIRE_MILVUS").as_deref() == Ok("1")
}

/// `HOST:PORT` of the server, or `None` (after saying so) when the tests should skip.
fn server(test: &str) -> Option<String> {
    match std::env::var("GOODTRIEVER_MILVUS") {
        Ok(s) if !s.is_empty() => Some(s),
        _ if required() => {
            panic!("{test}: GOODTRIEVER_REQUIRE_MILVUS=1 but GOODTRIEVER_MILVUS is not set")
        }
        _ => {
            eprintln!("skipping {test}: set GOODTRIEVER_MILVUS=HOST:PORT (scripts/milvus.sh start) to run it");
            None
        }
    }
}

/// A collection name no other test (or earlier run) uses, dropped when the guard goes.
struct Collection {
    address: String,
}

impl Collection {
    fn new(server: &str, what: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let address = format!(
            "milvus://{server}/gt_{what}_{}_{}?timeout_ms=5000",
            std::process::id(),
            nanos % 1_000_000_000
        );
        Collection { address }
    }
}

impl Drop for Collection {
    fn drop(&mut self) {
        let _ = MilvusStore::drop_collection(&self.address);
    }
}

fn fingerprint(model: &str) -> ModelFingerprint {
    let mut fp = ModelFingerprint::named(model, DIM);
    fp.vocab_size = Some(VOCAB);
    fp
}

/// A local f16 store of `segments` segments of `rows` clustered rows each.
fn local_store(dir: &Path, model: &str, segments: usize, rows: usize, seed: u64) -> Datastore {
    let ds = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fingerprint(model),
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F16,
        },
    )
    .unwrap();
    for s in 0..segments {
        let keys = common::clustered(rows, DIM, 16, seed + s as u64);
        let values = common::values(rows, seed + s as u64);
        ds.append(
            Keys::F32(&keys),
            &values,
            Provenance::new(format!("test segment {s}")).with_tag("t"),
        )
        .unwrap();
    }
    ds
}

fn quick_push() -> PushOptions {
    PushOptions {
        batch_rows: 512,
        checkpoint_rows: 1024,
        ..PushOptions::default()
    }
}

fn search(store: &dyn Store, q: &[f32], k: usize, params: &SearchParams) -> Vec<Vec<Neighbour>> {
    let mut out = vec![Vec::new(); q.len() / DIM];
    store.search_into(q, k, params, &mut out).unwrap();
    out
}

#[test]
fn an_unreachable_server_is_a_clear_error_naming_the_address_in_bounded_time() {
    // Needs no server: port 9 on loopback has nobody listening.
    let t = Instant::now();
    let err =
        MilvusStore::open("milvus://127.0.0.1:9/nothing_here?connect_timeout_ms=1500").unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(
            err,
            DatastoreError::Unavailable { .. } | DatastoreError::TimedOut { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("milvus://127.0.0.1:9/nothing_here"),
        "{err}"
    );
    // The one dispatch every command uses gives the same error.
    let err = open_store("milvus://127.0.0.1:9/nothing_here?connect_timeout_ms=500").unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    let err = open_store("milvus://127.0.0.1:9/bad-name").unwrap_err();
    assert!(matches!(err, DatastoreError::BadAddress { .. }), "{err}");
}

#[test]
fn pushed_store_searches_like_the_local_exact_scan() {
    let Some(srv) = server("pushed_store_searches_like_the_local_exact_scan") else {
        return;
    };
    let _shared = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = local_store(&tmp.path().join("s"), "m", 2, 2500, 11);
    let coll = Collection::new(&srv, "recall");
    let report = push(&local, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    assert_eq!(
        (report.rows, report.copied_rows, report.segments),
        (5000, 5000, 2)
    );

    let remote = MilvusStore::open(&coll.address).unwrap();
    assert_eq!(remote.len(), local.len());
    assert_eq!(Store::fingerprint(&remote), local.fingerprint());
    assert_eq!(Store::key_type(&remote), local.key_type());
    let (ls, rs) = (local.segments(), remote.segments());
    assert_eq!(ls.len(), rs.len());
    for (l, r) in ls.iter().zip(&rs) {
        assert_eq!(
            (l.id, l.rows, l.first_id, &l.provenance),
            (r.id, r.rows, r.first_id, &r.provenance)
        );
    }
    let v = verify_milvus(&remote, Some(&local), 200).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert_eq!(
        (v.counted_rows, v.uncommitted_rows, v.sampled_rows),
        (5000, 0, 200)
    );

    let k = 1024;
    let queries = common::clustered(8, DIM, 16, 999);
    let exact = search(&local, &queries, k, &SearchParams::exact());
    let got = search(&remote, &queries, k, &SearchParams::hnsw(Some(k)));
    let mut hits = 0usize;
    let mut worst = 0f32;
    for (row, (e, g)) in exact.iter().zip(&got).enumerate() {
        assert_eq!(g.len(), k, "row {row}");
        assert!(
            g.windows(2).all(|w| w[0].dist <= w[1].dist),
            "row {row} is not sorted"
        );
        assert_eq!(g[0].id, e[0].id, "row {row}: the nearest row differs");
        let truth: std::collections::HashMap<u64, &Neighbour> =
            e.iter().map(|n| (n.id, n)).collect();
        for n in g {
            if let Some(t) = truth.get(&n.id) {
                hits += 1;
                assert_eq!(n.value, t.value, "row {row} id {}", n.id);
                let rel = (n.dist - t.dist).abs() / t.dist.max(1.0);
                worst = worst.max(rel);
            }
        }
    }
    let recall = hits as f64 / (k * exact.len()) as f64;
    eprintln!("recall@{k} = {recall:.4}, largest relative distance difference {worst:.2e}");
    assert!(recall >= 0.99, "recall@{k} = {recall}");
    assert!(
        worst < 1e-4,
        "Milvus's distances differ from exact ones by up to {worst} (relative)"
    );
}

fn control(
    toxic: Arc<dyn Store>,
    nontoxic: Arc<dyn Store>,
    k: usize,
    search: SearchParams,
) -> (Detoxifier, AdjustOptions) {
    let opts = AdjustOptions {
        params: RuleParams {
            k,
            temperature: 50.0,
            ..RuleParams::default()
        },
        mode: Mode::Ensemble,
    };
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: toxic,
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: nontoxic,
            weight: 1.0,
        },
    ];
    (Detoxifier::new(stores, opts, search, None).unwrap(), opts)
}

#[test]
fn the_rule_answers_like_it_does_over_the_local_stores() {
    let Some(srv) = server("the_rule_answers_like_it_does_over_the_local_stores") else {
        return;
    };
    let _shared = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let tox = Arc::new(local_store(&tmp.path().join("t"), "m", 1, 1500, 21));
    let non = Arc::new(local_store(&tmp.path().join("n"), "m", 1, 1500, 22));
    let (ct, cn) = (
        Collection::new(&srv, "ruletox"),
        Collection::new(&srv, "rulenon"),
    );
    push(&tox, &ct.address, &quick_push(), &|_, _| {}).unwrap();
    push(&non, &cn.address, &quick_push(), &|_, _| {}).unwrap();
    let k = 256;
    let (local, opts) = control(tox.clone(), non.clone(), k, SearchParams::exact());
    // ef at the store's size makes Milvus's HNSW exhaustive, so the neighbour sets are the
    // exact ones and only the distances' float rounding may differ.
    let (remote, _) = control(
        open_store(&ct.address).unwrap(),
        open_store(&cn.address).unwrap(),
        k,
        SearchParams::hnsw(Some(1500)),
    );
    let q = common::clustered(6, DIM, 16, 777);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    local
        .adjust_sparse(&q, &opts, &mut DetoxScratch::default(), &mut a)
        .unwrap();
    remote
        .adjust_sparse(&q, &opts, &mut DetoxScratch::default(), &mut b)
        .unwrap();
    for (row, (x, y)) in a.iter().zip(&b).enumerate() {
        let (
            SparseRow::Bias {
                pairs: px,
                scale: sx,
            },
            SparseRow::Bias {
                pairs: py,
                scale: sy,
            },
        ) = (x, y)
        else {
            panic!("row {row}: not a bias answer");
        };
        assert_eq!(sx, sy);
        assert_eq!(px.len(), py.len(), "row {row}: different tokens");
        for (p, q) in px.iter().zip(py) {
            assert_eq!(p.0, q.0, "row {row}");
            assert!(
                (p.1 - q.1).abs() <= 1e-3 * p.1.abs().max(1.0),
                "row {row} token {}: {} vs {}",
                p.0,
                p.1,
                q.1
            );
        }
    }
}

#[test]
fn an_interrupted_push_resumes_without_duplicates_and_a_rerun_changes_nothing() {
    let Some(srv) =
        server("an_interrupted_push_resumes_without_duplicates_and_a_rerun_changes_nothing")
    else {
        return;
    };
    let _shared = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = local_store(&tmp.path().join("s"), "m", 3, 1000, 31);
    let coll = Collection::new(&srv, "resume");
    // Interrupt after rows 1024..1536 were inserted but before their checkpoint.
    let interrupted = std::panic::catch_unwind(AssertUnwindSafe(|| {
        push(&local, &coll.address, &quick_push(), &|done, _| {
            if done == 1536 {
                panic!("interrupted");
            }
        })
    }));
    assert!(interrupted.is_err());
    let err = MilvusStore::open(&coll.address).unwrap_err();
    assert!(
        err.to_string()
            .contains("has not finished (1024 of 3000 rows"),
        "{err}"
    );

    let report = push(&local, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    assert_eq!((report.resumed_rows, report.copied_rows), (1024, 1976));
    let remote = MilvusStore::open(&coll.address).unwrap();
    let v = verify_milvus(&remote, Some(&local), 300).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert_eq!((v.counted_rows, v.uncommitted_rows), (3000, 0));

    let again = push(&local, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    assert_eq!((again.resumed_rows, again.copied_rows), (3000, 0));

    // Another store into the same collection is refused, and changes nothing.
    let other = local_store(&tmp.path().join("o"), "m", 1, 700, 32);
    let err = push(&other, &coll.address, &quick_push(), &|_, _| {}).unwrap_err();
    assert!(err.to_string().contains("another store"), "{err}");
    assert!(verify_milvus(&remote, Some(&local), 50).unwrap().is_ok());
}

#[test]
fn a_store_of_another_model_is_refused() {
    let Some(srv) = server("a_store_of_another_model_is_refused") else {
        return;
    };
    let _shared = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let a = local_store(&tmp.path().join("a"), "model-a", 1, 600, 41);
    let b = Arc::new(local_store(&tmp.path().join("b"), "model-b", 1, 600, 42));
    let coll = Collection::new(&srv, "fp");
    push(&a, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    let remote = open_store(&coll.address).unwrap();
    let opts = AdjustOptions::default();
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: remote,
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: b.clone(),
            weight: 1.0,
        },
    ];
    let Err(err) = Detoxifier::new(stores, opts, SearchParams::default(), None) else {
        panic!("a Milvus store of another model was accepted")
    };
    // The same refusal as for two local stores of different models.
    let a_local: Arc<dyn Store> = Arc::new(a);
    let Err(local_err) = Detoxifier::new(
        vec![
            ControlStore {
                name: "toxic".into(),
                store: a_local,
                weight: -1.0,
            },
            ControlStore {
                name: "nontoxic".into(),
                store: b.clone(),
                weight: 1.0,
            },
        ],
        opts,
        SearchParams::default(),
        None,
    ) else {
        panic!("two local stores of different models were accepted")
    };
    assert_eq!(
        std::mem::discriminant(&err),
        std::mem::discriminant(&local_err),
        "{err} / {local_err}"
    );
    assert!(err.to_string().contains("model"), "{err}");
    // Pushing a store of another model into the collection is refused too.
    let err = push(&b, &coll.address, &quick_push(), &|_, _| {}).unwrap_err();
    assert!(matches!(err, DatastoreError::ModelMismatch(_)), "{err}");
}

#[test]
fn appends_are_searchable_at_once_and_bad_appends_change_nothing() {
    let Some(srv) = server("appends_are_searchable_at_once_and_bad_appends_change_nothing") else {
        return;
    };
    let _shared = SERVER.read().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = local_store(&tmp.path().join("s"), "m", 1, 800, 51);
    let coll = Collection::new(&srv, "append");
    push(&local, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    let remote = MilvusStore::open(&coll.address).unwrap();
    let keys: Vec<f32> = (0..3 * DIM).map(|i| 500.0 + i as f32).collect();
    let seg = remote
        .append(
            Keys::F32(&keys),
            &[7, 8, 9],
            Provenance::new("grpc:AddExamples"),
        )
        .unwrap();
    assert_eq!((seg.id, seg.rows, seg.first_id), (1, 3, Some(800)));
    assert_eq!(remote.len(), 803);
    let got = search(&remote, &keys[DIM..2 * DIM], 1, &SearchParams::default());
    assert_eq!((got[0][0].id, got[0][0].value), (801, 8));
    assert!(got[0][0].dist < 1e-3);
    // Another handle sees the append after a refresh.
    let other = MilvusStore::open(&coll.address).unwrap();
    assert_eq!(other.len(), 803);
    assert!(!other.refresh().unwrap());

    for (keys, values, what) in [
        (vec![f32::NAN; DIM], vec![1u32], "finite"),
        (vec![0.0; DIM + 1], vec![1], "dimension"),
        (vec![0.0; DIM], vec![VOCAB as u32], "vocabulary"),
        (vec![0.0; DIM], vec![1, 2], "values"),
    ] {
        let err = remote
            .append(Keys::F32(&keys), &values, Provenance::new("bad"))
            .unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    let err = remote
        .append(Keys::F32(&[0.0; DIM]), &[1], Provenance::new("two\nlines"))
        .unwrap_err();
    assert!(matches!(err, DatastoreError::BadProvenance { .. }), "{err}");
    assert_eq!(remote.len(), 803);
    let v = verify_milvus(&remote, None, 100).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert_eq!(
        (v.counted_rows, v.uncommitted_rows, v.segments),
        (803, 0, 2)
    );
}

fn milvus_sh(arg: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/milvus.sh");
    let status = Command::new(script)
        .arg(arg)
        .env("MILVUS_KEEP_DATA", "1")
        .status()
        .expect("run scripts/milvus.sh");
    assert!(status.success(), "scripts/milvus.sh {arg} failed");
}

/// Polls `f` until it succeeds or `limit` passes.
fn until_ok<T>(limit: Duration, mut f: impl FnMut() -> Result<T, DatastoreError>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if t.elapsed() > limit => panic!("still failing after {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// The server's address for a test that kills and restarts it, or `None` (after saying so)
/// when it should skip: that needs `GOODTRIEVER_MILVUS_RESTART=1` besides the address.
fn restartable_server(test: &str) -> Option<String> {
    let srv = server(test)?;
    if std::env::var("GOODTRIEVER_MILVUS_RESTART").as_deref() != Ok("1") {
        assert!(
            !required(),
            "{test}: GOODTRIEVER_REQUIRE_MILVUS=1 needs GOODTRIEVER_MILVUS_RESTART=1 too"
        );
        eprintln!("skipping {test}: it restarts the server; set GOODTRIEVER_MILVUS_RESTART=1 (scripts/milvus.sh must control it)");
        return None;
    }
    Some(srv)
}

#[test]
fn milvus_killed_while_serving_gives_unavailable_in_time_then_recovers_with_acknowledged_adds() {
    let test = "milvus_killed_while_serving_gives_unavailable_in_time_then_recovers_with_acknowledged_adds";
    let Some(srv) = restartable_server(test) else {
        return;
    };
    let _alone = SERVER.write().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let local = Arc::new(local_store(&tmp.path().join("s"), "m", 1, 600, 61));
    let coll = Collection::new(&srv, "restart");
    push(&local, &coll.address, &quick_push(), &|_, _| {}).unwrap();
    let timeout = Duration::from_millis(2000);
    let address = coll.address.replace("timeout_ms=5000", "timeout_ms=2000");
    let remote: Arc<dyn Store> = open_store(&address).unwrap();
    // An add acknowledged before the kill.
    let keys: Vec<f32> = (0..2 * DIM).map(|i| -300.0 - i as f32).collect();
    remote
        .append(
            Keys::F32(&keys),
            &[3, 4],
            Provenance::new("before the kill"),
        )
        .unwrap();
    let (detox, opts) = control(remote.clone(), local.clone(), 16, SearchParams::default());
    let q = common::clustered(2, DIM, 16, 5);
    let mut out = Vec::new();
    detox
        .adjust_sparse(&q, &opts, &mut DetoxScratch::default(), &mut out)
        .unwrap();

    // A crash: the server gets no chance to flush or deregister (docs/scale-out.md says how
    // long it takes to come back on its data, and why).
    milvus_sh("kill");
    let t = Instant::now();
    let err = detox
        .adjust_sparse(&q, &opts, &mut DetoxScratch::default(), &mut out)
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        took <= timeout + Duration::from_secs(1),
        "the failed step took {took:?}"
    );
    let DetoxError::Search { source, .. } = &err else {
        panic!("not a search error: {err}")
    };
    assert!(
        matches!(
            source,
            DatastoreError::Unavailable { .. } | DatastoreError::TimedOut { .. }
        ),
        "{err}"
    );
    // What does not depend on Milvus keeps working.
    let alone = search(local.as_ref(), &q, 4, &SearchParams::exact());
    assert_eq!(alone.len(), 2);

    milvus_sh("start");
    let t = Instant::now();
    until_ok(Duration::from_secs(180), || {
        let mut out = Vec::new();
        detox
            .adjust_sparse(&q, &opts, &mut DetoxScratch::default(), &mut out)
            .map_err(|e| DatastoreError::Backend {
                location: "engine".into(),
                detail: e.to_string(),
            })
    });
    eprintln!("recovered {:?} after the restart", t.elapsed());
    let got = search(remote.as_ref(), &keys[DIM..], 1, &SearchParams::default());
    assert_eq!(
        (got[0][0].id, got[0][0].value),
        (601, 4),
        "the acknowledged add is gone"
    );
    // A server just restarted is slow to answer at first (it reloads collections).
    let reopened = until_ok(Duration::from_secs(180), || MilvusStore::open(&address));
    assert_eq!(reopened.len(), 602, "the acknowledged add's commit is gone");
    let v = verify_milvus(&reopened, None, 50).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
}

/// Sparse answers equal up to the float rounding of a restarted server's distances.
fn assert_close(got: &[SparseRow], want: &[SparseRow], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (row, (g, w)) in got.iter().zip(want).enumerate() {
        let (
            SparseRow::Bias {
                pairs: pg,
                scale: sg,
            },
            SparseRow::Bias {
                pairs: pw,
                scale: sw,
            },
        ) = (g, w)
        else {
            panic!("{what}: row {row} is not a bias answer");
        };
        assert!(
            (sg - sw).abs() <= 1e-5,
            "{what}: row {row} scale {sg} vs {sw}"
        );
        assert_eq!(
            pg.iter().map(|p| p.0).collect::<Vec<_>>(),
            pw.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{what}: row {row} tokens"
        );
        for (a, b) in pg.iter().zip(pw) {
            assert!(
                (a.1 - b.1).abs() <= 1e-4 * b.1.abs().max(1.0),
                "{what}: row {row} token {}: {} vs {}",
                a.0,
                a.1,
                b.1
            );
        }
    }
}

#[test]
fn grpc_over_milvus_stores_answers_unavailable_in_time_while_milvus_is_down_and_recovers() {
    use goodtriever::server::proto::{self, Tensor};
    use goodtriever::server::{convert, ServeOptions};
    use tonic::Code;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let test =
        "grpc_over_milvus_stores_answers_unavailable_in_time_while_milvus_is_down_and_recovers";
    let Some(srv) = restartable_server(test) else {
        return;
    };
    let _alone = SERVER.write().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let tox = local_store(&tmp.path().join("t"), "m", 1, 600, 71);
    let non = local_store(&tmp.path().join("n"), "m", 1, 600, 72);
    let (ct, cn) = (
        Collection::new(&srv, "grpctox"),
        Collection::new(&srv, "grpcnon"),
    );
    push(&tox, &ct.address, &quick_push(), &|_, _| {}).unwrap();
    push(&non, &cn.address, &quick_push(), &|_, _| {}).unwrap();
    // A serving bound: every step that needs Milvus answers within it, one way or the other.
    let timeout = Duration::from_millis(2000);
    let open = |c: &Collection| {
        open_store(&c.address.replace("timeout_ms=5000", "timeout_ms=2000")).unwrap()
    };
    // Both stores in Milvus: no step can be answered without it.
    let (detox, _) = control(open(&ct), open(&cn), 16, SearchParams::default());
    let engine = Arc::new(detox);

    let q = common::clustered(2, DIM, 16, 5);
    let mut want = Vec::new();
    engine
        .adjust_sparse(
            &q,
            engine.defaults(),
            &mut DetoxScratch::default(),
            &mut want,
        )
        .unwrap();
    let request = || proto::AdjustRequest {
        hidden: Some(Tensor {
            data: server_support::f32_bytes(&q).into(),
            dtype: proto::DType::F32 as i32,
            rows: 0,
        }),
        ..Default::default()
    };
    let rows = |r: proto::AdjustResponse| -> Vec<SparseRow> {
        r.rows
            .iter()
            .map(|row| convert::sparse_row_from_proto(row).unwrap())
            .collect()
    };

    // The server and its clients on their own runtime; the store calls above run outside it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = server_support::start(engine.clone(), ServeOptions::default()).await;
        let mut client = server.client().await;
        let mut health = HealthClient::new(server.channel().await);

        for i in 0..3 {
            let got = rows(client.adjust(request()).await.unwrap().into_inner());
            assert_close(&got, &want, &format!("call {i} before the kill"));
        }

        milvus_sh("kill");
        let t = Instant::now();
        let status = client.adjust(request()).await.unwrap_err();
        let took = t.elapsed();
        // UNAVAILABLE for a refused connection, DEADLINE_EXCEEDED for a call that got no
        // answer in time (src/server/status.rs); both within the address's bound.
        assert!(
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{status:?}"
        );
        assert!(
            took <= timeout + Duration::from_millis(1500),
            "the failed step took {took:?}"
        );
        assert!(
            status.message().contains("milvus://") && status.message().contains("gt_grpc"),
            "the message does not name the store's address: {}",
            status.message()
        );
        // What does not need Milvus still answers, at once.
        let t = Instant::now();
        let h = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.status, ServingStatus::Serving as i32);
        let info = client
            .info(proto::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info.stores.iter().map(|s| s.rows).collect::<Vec<_>>(),
            vec![600, 600]
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "health and info took {:?}",
            t.elapsed()
        );
        eprintln!("down: {} in {took:?}", status.code());

        milvus_sh("start");
        let t = Instant::now();
        let mut failures = 0;
        let got = loop {
            match client.adjust(request()).await {
                Ok(r) => break rows(r.into_inner()),
                Err(s) if t.elapsed() < Duration::from_secs(180) => {
                    assert!(
                        matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                        "while recovering: {s:?}"
                    );
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(s) => panic!("still failing 180 s after the restart: {s:?}"),
            }
        };
        eprintln!(
            "recovered {:?} after `milvus.sh start` returned ({failures} failed steps meanwhile)",
            t.elapsed()
        );
        assert_close(&got, &want, "after the restart");
        let got = rows(client.adjust(request()).await.unwrap().into_inner());
        assert_close(&got, &want, "the next call");
        server.stop().await;
    });
}
