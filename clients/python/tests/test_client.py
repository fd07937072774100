"""The Python client against a real `goodtriever serve`."""

import subprocess
import urllib.request

import grpc
import numpy as np
import pytest

from goodtriever_client import Bias, Client, GoodtrieverError, apply_bias

from conftest import DIM, TOKEN, VOCAB, make_keys, start_server, stop_server


@pytest.fixture
def client(server):
    with Client(server.grpc, admin_token=TOKEN) as c:
        yield c


def queries(rows, seed):
    keys, _ = make_keys(rows, seed)
    return keys + np.random.default_rng(seed).normal(0, 0.1, size=keys.shape).astype(np.float32)


def assert_same_log_probs(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), "different tokens filtered"
    finite = np.isfinite(a)
    np.testing.assert_allclose(a[finite], b[finite], rtol=0, atol=2e-4)


def test_info(client):
    info = client.info()
    assert info.model.hidden_size == DIM
    assert info.model.vocab_size == VOCAB
    assert info.model.key_type == "last_ffn_input"
    assert [s.name for s in info.stores] == ["toxic", "nontoxic"]
    assert info.writes_enabled and not info.has_model
    assert info.defaults.k == 32


def test_sparse_applied_by_the_client_equals_dense(client):
    hidden = queries(4, 11)
    logits = np.random.default_rng(3).normal(0, 3, size=(4, VOCAB)).astype(np.float32)
    bias = client.adjust(hidden)
    assert isinstance(bias, Bias) and len(bias.rows) == 4
    assert any(len(r.tokens) for r in bias.rows)
    dense = client.adjust(hidden, logits)
    assert dense.shape == (4, VOCAB)
    assert_same_log_probs(apply_bias(logits, bias), dense)
    # f16 hidden states and f16 logits are accepted; the sparse and dense forms still agree.
    h16 = hidden.astype(np.float16)
    bias16 = client.adjust(h16)
    dense16 = client.adjust(h16, logits.astype(np.float16))
    assert_same_log_probs(apply_bias(logits.astype(np.float16).astype(np.float32), bias16), dense16)


@pytest.mark.parametrize("mode", ["toxic-only", "knn-lm"])
def test_other_modes_and_overrides(client, mode):
    hidden = queries(2, 12)
    logits = np.random.default_rng(4).normal(0, 3, size=(2, VOCAB)).astype(np.float32)
    bias = client.adjust(hidden, mode=mode, alpha=0.5, k=8, filter_p=0.95)
    assert bias.params["mode"] == mode and bias.params["k"] == 8
    if mode == "toxic-only":
        assert bias.rows[0].kind == "bias" and bias.rows[0].scale == pytest.approx(1.5)
    else:
        assert bias.rows[0].kind == "mixture"
    dense = client.adjust(hidden, logits, mode=mode, alpha=0.5, k=8, filter_p=0.95)
    assert_same_log_probs(apply_bias(logits, bias), dense)


def test_the_gate_and_the_prior_are_per_call_options(client):
    hidden = queries(3, 13)
    logits = np.random.default_rng(5).normal(0, 3, size=(3, VOCAB)).astype(np.float32)
    plain = client.adjust(hidden, alpha=2.0)
    both = client.adjust(hidden, alpha=2.0, gate=1.0, gate_neighbours=8, prior=0.5)
    assert both.params["gate"] == pytest.approx(1.0)
    assert both.params["gate_neighbours"] == 8 and both.params["prior"] == pytest.approx(0.5)
    assert plain.params["gate"] == 0.0 and plain.params["prior"] == 0.0
    # The variants change the answer but not its shape: the client applies it the same way.
    assert any(not np.array_equal(a.values, b.values) or not np.array_equal(a.tokens, b.tokens)
               for a, b in zip(plain.rows, both.rows))
    dense = client.adjust(hidden, logits, alpha=2.0, gate=1.0, gate_neighbours=8, prior=0.5)
    assert_same_log_probs(apply_bias(logits, both), dense)
    # Out of range, or outside the ensemble, is the caller's error, with the knob named.
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(hidden, gate=1.5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "gate" in e.value.details
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(hidden, gate=0.5, mode="toxic-only")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "ensemble" in e.value.details


def test_skip_leaves_rows_that_lean_nowhere_toxic_uncontrolled(client):
    hidden = queries(3, 17)
    logits = np.random.default_rng(7).normal(0, 3, size=(3, VOCAB)).astype(np.float32)
    uncontrolled = client.adjust(hidden, logits, alpha=0.0)
    controlled = client.adjust(hidden, logits, alpha=2.0)
    assert not np.array_equal(uncontrolled, controlled)
    # No token leans toxic by a ratio of 1e30: every row is skipped, so none is biased.
    skipped = client.adjust(hidden, logits, alpha=2.0, skip=0.5, skip_ratio=1e30)
    assert_same_log_probs(skipped, uncontrolled)
    # Skipping at threshold 0 is off: the full control.
    assert_same_log_probs(client.adjust(hidden, logits, alpha=2.0, skip=0.0), controlled)
    # The decision reads the base distribution, so the sparse form cannot skip.
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(hidden, skip=0.05)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "logits" in e.value.details
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(hidden, logits, skip=1.0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "skip" in e.value.details


def test_skip_counted_in_the_nucleus_is_passed_to_the_server(client):
    hidden = queries(3, 18)
    logits = np.random.default_rng(8).normal(0, 3, size=(3, VOCAB)).astype(np.float32)
    uncontrolled = client.adjust(hidden, logits, alpha=0.0)
    # Nothing leans toxic at a ratio of 1e30, inside the nucleus or out: every row is skipped.
    skipped = client.adjust(hidden, logits, alpha=2.0, skip=0.5, skip_ratio=1e30, skip_in_nucleus=True)
    assert_same_log_probs(skipped, uncontrolled)
    # Without a nucleus (filter_p 1) counting inside it is counting over everything.
    wide = dict(alpha=2.0, skip=0.05, filter_p=1.0)
    assert_same_log_probs(client.adjust(hidden, logits, skip_in_nucleus=True, **wide),
                          client.adjust(hidden, logits, **wide))
    with pytest.raises(TypeError):
        client.adjust(hidden, logits, skip_in_nucleas=True)


def test_a_session_answers_100_steps_in_order(client):
    steps = [queries(1, 100 + i) for i in range(100)]
    with client.session(k=16) as s:
        answers = [s.step(h) for h in steps]
    assert [a.step for a in answers] == list(range(100))
    for h, a in zip(steps[::17], answers[::17]):
        unary = client.adjust(h, k=16)
        np.testing.assert_array_equal(unary.rows[0].tokens, a.rows[0].tokens)
        np.testing.assert_array_equal(unary.rows[0].values, a.rows[0].values)


def test_a_reusing_session_follows_the_emitted_token(client):
    """With `reuse`, a row whose sequence emitted a token its neighbours predicted is answered
    from their successors: here the next query sits on the successor of one of them."""
    keys, values = make_keys(300, 1)  # the toxic store, as imported (before any add)
    k = 16
    q0 = keys[40] + 0.01
    near = np.argsort(((keys - q0) ** 2).sum(axis=1))[:k]
    r = int(next(i for i in near if i + 1 < len(keys)))
    with client.session(k=k, mode="toxic-only", reuse=0.05, reuse_radius=4.0) as s:
        first = s.step(q0[None, :])
        assert first.rows_reused == 0 and first.params["reuse"] == pytest.approx(0.05)
        second = s.step(keys[r + 1][None, :] + 0.01, emitted_tokens=[values[r]])
        assert second.rows_reused == 1 and s.total_rows_reused == 1
        # A token no neighbour predicted leaves nothing to follow: searched.
        unpredicted = next(t for t in range(VOCAB) if t not in set(values[near]))
        third = s.step(keys[r + 2][None, :], emitted_tokens=[unpredicted])
        assert third.rows_reused == 0
    # A continuation that does not match the previous step ends the session with a sentence.
    with client.session(reuse=0.05) as s:
        s.step(queries(2, 5))
        with pytest.raises(GoodtrieverError) as e:
            s.step(queries(1, 6), emitted_tokens=[1])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "continued_rows" in e.value.details
    with client.session(reuse=0.05) as s:
        s.step(queries(2, 5))
        s.step(queries(1, 6), emitted_tokens=[1], continued_rows=[1])


def test_calls_in_flight_together_each_get_their_own_answer(client):
    """`adjust_future` sends at once; answers arrive for their own requests, whatever the order
    they are waited for in, and a refused call raises from `result()`."""
    hidden = [queries(1, 200 + i) for i in range(4)]
    pending = [client.adjust_future(h, k=16) for h in hidden]
    bad = client.adjust_future(np.zeros((1, DIM + 1), np.float32))
    for h, p in reversed(list(zip(hidden, pending))):
        got = p.result(timeout=30)
        assert p.done()
        want = client.adjust(h, k=16)
        np.testing.assert_array_equal(got.rows[0].tokens, want.rows[0].tokens)
        np.testing.assert_array_equal(got.rows[0].values, want.rows[0].values)
    with pytest.raises(GoodtrieverError) as e:
        bad.result()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        client.adjust_future(np.zeros((1, 2, DIM), np.float32))


def test_add_examples_then_adjust_sees_them(client):
    q = np.linspace(30, 45, DIM, dtype=np.float32)
    new_token = 198
    assert new_token not in client.adjust(q).rows[0].tokens
    keys = q[None, :] + 0.01 * np.arange(20, dtype=np.float32)[:, None]
    tokens = np.where(np.arange(20) % 5 == 4, new_token + 1, new_token)
    before = client.info().stores[1].rows
    r = client.add_examples("nontoxic", keys, tokens, source="pytest", tag="drift")
    assert r.rows_added == 20 and r.store.rows == before + 20
    row = client.adjust(q).rows[0]
    i = list(row.tokens).index(new_token)
    assert row.values[i] > 0


def test_bad_input_gets_a_code_and_a_sentence(client, server):
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(np.zeros((1, DIM + 1), np.float32))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "whole number of rows" in e.value.details
    bad = queries(1, 1)
    bad[0, 2] = np.nan
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(bad)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.value.details
    with pytest.raises(GoodtrieverError) as e:
        client.adjust(queries(1, 1), k=0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(GoodtrieverError) as e:
        client.add_examples("neutral", queries(1, 1), [1])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with Client(server.grpc) as anonymous:
        with pytest.raises(GoodtrieverError) as e:
            anonymous.add_examples("toxic", queries(1, 1), [1])
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(GoodtrieverError) as e:
        client.add_texts("toxic", ["no model here"])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # Still serving.
    assert len(client.adjust(queries(2, 2)).rows) == 2


def test_metrics_endpoint(client, server):
    client.adjust(queries(1, 5))
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    assert 'goodtriever_requests_total{method="Adjust"}' in text
    assert 'goodtriever_store_rows{store="toxic"} 300' in text


def test_unix_socket_target(stores, binary, tmp_path, client):
    """A sidecar on the same host can listen on a Unix socket; grpcio dials `unix:PATH` as is."""
    sock = tmp_path / "goodtriever.sock"
    served = start_server(
        binary, stores["toxic"], stores["nontoxic"],
        "--vocab-size", str(VOCAB), "--k", "32", "--temperature", "10", "--exact",
        addr=f"unix:{sock}",
    )
    try:
        assert served.grpc == f"unix:{sock}"
        hidden = queries(2, 21)
        with Client(served.grpc) as c, c.session() as s:
            over_socket = s.step(hidden)
        over_tcp = client.adjust(hidden)
        for a, b in zip(over_socket.rows, over_tcp.rows):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.values, b.values)
    finally:
        stop_server(served)
    assert not sock.exists(), "serve removes its socket file on exit"


def _self_signed(directory):
    """A fresh certificate for localhost and 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "goodtriever test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    return directory / "cert.pem", directory / "key.pem"


def test_tls(stores, binary, tmp_path, client):
    """`serve --tls-cert --tls-key`: a client given the certificate (`root_certificates`) gets
    the same answers as over plain text; a plain-text client is refused."""
    pytest.importorskip("cryptography", reason="the test extra (pip install ./clients/python[test])")
    cert, key = _self_signed(tmp_path)
    served = start_server(
        binary, stores["toxic"], stores["nontoxic"],
        "--vocab-size", str(VOCAB), "--k", "32", "--temperature", "10", "--exact",
        "--tls-cert", str(cert), "--tls-key", str(key),
    )
    try:
        hidden = queries(2, 23)
        with Client(served.grpc, root_certificates=cert.read_bytes()) as c:
            assert c.info().model.hidden_size == DIM
            with c.session() as s:
                over_tls = s.step(hidden)
        over_plain = client.adjust(hidden)
        for a, b in zip(over_tls.rows, over_plain.rows):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.values, b.values)
        with Client(served.grpc, timeout=10) as plain:
            with pytest.raises(GoodtrieverError) as err:
                plain.info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
    finally:
        stop_server(served)


def test_tls_files_that_make_no_identity_are_refused(stores, binary, tmp_path):
    pytest.importorskip("cryptography", reason="the test extra (pip install ./clients/python[test])")
    cert, _key = _self_signed(tmp_path)
    done = subprocess.run(
        [
            str(binary), "serve", "--toxic", str(stores["toxic"]), "--nontoxic",
            str(stores["nontoxic"]), "--vocab-size", str(VOCAB), "--addr", "127.0.0.1:0",
            "--no-metrics",
            "--tls-cert", str(cert), "--tls-key", str(cert),
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "listening" not in done.stdout
    assert "--tls-key holds no PEM private key" in done.stderr, done.stderr


def test_the_official_reflection_client_lists_the_services(server):
    # grpcio-reflection speaks only grpc.reflection.v1alpha; the server offers it beside v1.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.grpc) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "goodtriever.v1.Goodtriever" in services
        assert "grpc.health.v1.Health" in services
        # It can also fetch the service's definition, as grpcurl does to call a method.
        file = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(
            "goodtriever.v1.Goodtriever"
        )
        assert file.package == "goodtriever.v1"


def test_explain_names_the_rows_behind_the_moved_tokens(client):
    hidden = queries(2, 21)
    logits = np.random.default_rng(5).normal(0, 2, size=(2, VOCAB)).astype(np.float32)
    explained = client.explain(hidden, logits, top=4, rows=3)
    # The answer is the ordinary one: explaining does not change the step.
    assert_same_log_probs(explained.answer, client.adjust(hidden, logits))
    assert len(explained.explanations) == 2
    keys = {name: make_keys(300, seed)[0] for name, seed in (("toxic", 1), ("nontoxic", 2))}
    weights = {"toxic": -1.0, "nontoxic": 1.0}
    seen_rows = 0
    for q, e in zip(hidden, explained.explanations):
        assert e.pushed_down or e.pushed_up
        assert all(m.change < 0 for m in e.pushed_down)
        assert all(m.change > 0 for m in e.pushed_up)
        assert [m.change for m in e.pushed_down] == sorted(m.change for m in e.pushed_down)
        for m in list(e.pushed_down) + list(e.pushed_up):
            assert len(m.rows) <= 3 and m.rows_total >= len(m.rows) >= 1
            ws = [r.weight for r in m.rows]
            assert ws == sorted(ws, reverse=True) and all(0 < w <= 1 for w in ws)
            for r in m.rows:
                assert r.next_token == m.token
                assert r.store_weight == weights[r.store]
                # Imported stores record no source text.
                assert not r.HasField("source")
                if r.id < 300:  # rows other tests append come after the imported ones
                    d = float(((keys[r.store][r.id] - q) ** 2).sum())
                    assert abs(r.distance - d) <= 1e-3 * max(1.0, d)
                seen_rows += 1
    assert seen_rows > 0
    # The sparse form can be explained too, and the explanation does not depend on it.
    sparse = client.explain(hidden, logits, top=4, rows=3, form="sparse")
    assert isinstance(sparse.answer, Bias)
    assert [m.token for m in sparse.explanations[0].pushed_up] == [
        m.token for m in explained.explanations[0].pushed_up
    ]


def test_explain_refuses_bad_requests(client):
    hidden = queries(1, 22)
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    with pytest.raises(ValueError, match="logits"):
        client.explain(hidden, None)
    with pytest.raises(GoodtrieverError) as err:
        client.explain(hidden, logits, top=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "top" in str(err.value)
