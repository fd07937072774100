"""The transformers integration on a tiny randomly initialised llama made here (no download),
against a real `goodtriever serve` whose datastores are written here from the same model's
own hidden states.

What must hold:
- the hook captures the right tensor: at every generation step the row sent to the server equals
  the last layer's post-attention RMSNorm output computed by hand from `output_hidden_states`
  and the last attention block's output (and `final_hidden` equals the last hidden state);
- the scores `generate()` sees are exactly the server's dense answer for that hidden state and
  the step's raw logits;
- the control moves generation the expected way: the toxic store holds the tokens the model
  says on its own, the non-toxic store the runner-up tokens at the same hidden states, so with
  the processor the first step's token drops in probability and the runner-up is chosen.

Skipped when torch or transformers are not installed (CI does not install them).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from goodtriever_client import Client, apply_bias  # noqa: E402
from goodtriever_client.hf import GoodtrieverLogitsProcessor, apply_bias_torch, find_key_module  # noqa: E402

from conftest import DIM, VOCAB, import_store, start_server, stop_server  # noqa: E402

PROMPT = [1, 5, 9, 13]
NEW_TOKENS = 6
# Debian's torch 1.13 cannot import torch.distributed.fsdp on Python 3.11, which generate()
# touches only to decide synced_gpus; saying it avoids that import.
GEN = dict(do_sample=False, pad_token_id=0, synced_gpus=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        # Larger than the default 0.02 so that the model has preferences the control must
        # overcome (logits spread over a few nats instead of a near-uniform distribution).
        initializer_range=0.3,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def manual_keys(model, ids):
    """last_ffn_input and final_hidden of every position of `ids` [B, T], computed without the
    post-attention norm module: RMSNorm(x + attn(x)) by hand, x = the last layer's input."""
    layer = model.model.layers[-1]
    got = {}
    handle = layer.self_attn.register_forward_hook(lambda m, i, o: got.__setitem__("attn", o[0]))
    out = model(ids, output_hidden_states=True)
    handle.remove()
    x = out.hidden_states[-2]  # the input of the last decoder layer
    h = (x + got["attn"]).float()
    norm = layer.post_attention_layernorm
    ffn_in = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    final = model.model.norm(h + layer.mlp(ffn_in))
    # The decomposition is the model's: its last hidden state is norm(h + mlp(ffn_in)).
    torch.testing.assert_close(final, out.hidden_states[-1], rtol=0, atol=1e-5)
    return ffn_in, out.hidden_states[-1], out.logits


class SpyClient(Client):
    """A Client that records what the processor sends and what the server answers."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent, self.answers, self.via, self.cancelled = [], [], [], 0

    def adjust(self, hidden, logits=None, **kw):
        self.sent.append(np.array(hidden, dtype=np.float32))
        self.via.append("adjust")
        answer = super().adjust(hidden, logits, **kw)
        self.answers.append(answer)
        return answer

    def adjust_future(self, hidden, logits=None, **kw):
        self.sent.append(np.array(hidden, dtype=np.float32))
        self.via.append("adjust_future")
        pending = super().adjust_future(hidden, logits, **kw)
        spy = self

        class Recorded:
            def result(self, timeout=None):
                answer = pending.result(timeout)
                spy.answers.append(answer)
                return answer

            def cancel(self):
                spy.cancelled += 1
                return pending.cancel()

        return Recorded()


@pytest.fixture(scope="module")
def steered(tmp_path_factory, binary, model):
    """The uncontrolled greedy generation, and a server whose toxic store says "the model's own
    next token" and whose non-toxic store says "its runner-up" at the same hidden states."""
    prompt = torch.tensor([PROMPT])
    base = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True, **GEN
    )
    seq = base.sequences
    keys, _, logits = manual_keys(model, seq)
    positions = range(len(PROMPT) - 1, seq.shape[1] - 1)  # positions that predicted a new token
    k_rows = keys[0, list(positions)].numpy()
    toxic_values = seq[0, [p + 1 for p in positions]].numpy()
    runner_up = torch.topk(logits[0, list(positions)], 2, dim=-1).indices[:, 1].numpy()

    # Filler from other sequences (tokens not in the generation) so that k neighbours exist;
    # the same rows in both stores, so they cancel.
    rng = np.random.default_rng(7)
    others = np.setdiff1d(np.arange(2, VOCAB), seq[0].numpy())
    filler_ids = torch.as_tensor(rng.choice(others, size=(4, 12)))
    filler_keys, _, _ = manual_keys(model, filler_ids)
    filler_keys = filler_keys[:, :-1].reshape(-1, DIM).numpy()
    filler_values = filler_ids[:, 1:].reshape(-1).numpy()

    root = tmp_path_factory.mktemp("hf-stores")
    toxic = import_store(
        binary, root / "toxic", np.concatenate([k_rows, filler_keys]),
        np.concatenate([toxic_values, filler_values]), label="toxic",
    )
    nontoxic = import_store(
        binary, root / "nontoxic", np.concatenate([k_rows, filler_keys]),
        np.concatenate([runner_up, filler_values]), label="non_toxic",
    )
    served = start_server(
        binary, toxic, nontoxic,
        "--vocab-size", str(VOCAB), "--k", "16", "--temperature", "10", "--exact",
    )
    yield dict(base=base, runner_up=runner_up, grpc=served.grpc)
    stop_server(served)


@pytest.mark.parametrize("overlap", [True, False], ids=["sent-from-the-hook", "sent-by-the-processor"])
def test_generate_is_steered_with_three_lines(steered, model, overlap):
    client = SpyClient(steered["grpc"])
    prompt = torch.tensor([PROMPT])
    # The three lines of user code (plus this torch's synced_gpus workaround).
    proc = GoodtrieverLogitsProcessor(client, model, alpha=2.0, overlap=overlap)
    out = model.generate(
        prompt, logits_processor=[proc], max_new_tokens=NEW_TOKENS,
        output_scores=True, output_logits=True, return_dict_in_generate=True, **GEN,
    )
    proc.remove()
    assert proc.key_type == "last_ffn_input"
    assert proc.steps == NEW_TOKENS == len(client.sent)
    assert client.via == ["adjust_future" if overlap else "adjust"] * NEW_TOKENS
    assert client.cancelled == 0
    assert len(proc.step_seconds) == NEW_TOKENS and all(s > 0 for s in proc.step_seconds)
    seq = out.sequences
    assert seq.shape[1] == len(PROMPT) + NEW_TOKENS

    # 1. The hook captured the post-attention-norm output of the last layer at the last
    #    position, at every step (KV-cached steps included).
    keys, finals, _ = manual_keys(model, seq)
    for i, sent in enumerate(client.sent):
        pos = len(PROMPT) - 1 + i
        assert sent.shape == (1, DIM)
        np.testing.assert_allclose(sent[0], keys[0, pos].numpy(), rtol=0, atol=1e-5)
        # ...and not the final hidden state, which differs: the test can tell them apart.
        assert np.abs(sent[0] - finals[0, pos].numpy()).max() > 1e-2

    # 2. The scores generate() used are the server's answer for that hidden state: the dense
    #    form from the raw logits, and the client-side application of the sparse form.
    for i in range(NEW_TOKENS):
        raw = out.logits[i].float().numpy()
        got = out.scores[i].float().numpy()
        dense = client.adjust(keys[0, len(PROMPT) - 1 + i].numpy()[None], raw, alpha=2.0)
        assert np.array_equal(np.isneginf(got), np.isneginf(dense)), f"step {i}: filtered sets differ"
        finite = np.isfinite(got)
        np.testing.assert_allclose(got[finite], dense[finite], rtol=0, atol=2e-4)
        np.testing.assert_allclose(
            got[finite], apply_bias(raw, client.answers[i])[finite], rtol=0, atol=2e-4
        )
        # The sparse answer was not empty: the control did something at every step.
        assert len(client.answers[i].rows[0].tokens) > 0

    # 3. The expected direction. Uncontrolled, the model says `own` first; the toxic store
    #    holds exactly that (hidden state, token), the non-toxic store the runner-up.
    base = steered["base"]
    own = int(base.sequences[0, len(PROMPT)])
    runner_up = int(steered["runner_up"][0])
    base_lp = torch.log_softmax(base.logits[0][0].float(), -1)
    controlled_lp = out.scores[0][0].float()
    assert controlled_lp[own] < base_lp[own] - 1.0, (float(controlled_lp[own]), float(base_lp[own]))
    assert controlled_lp[runner_up] > base_lp[runner_up]
    assert int(seq[0, len(PROMPT)]) == runner_up != own
    assert not torch.equal(seq, base.sequences)


def test_without_the_processor_nothing_is_sent(steered, model):
    """Detached processors do not capture; generate is then the plain model's."""
    client = SpyClient(steered["grpc"])
    proc = GoodtrieverLogitsProcessor(client, model)
    proc.remove()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, **GEN)
    assert client.sent == []
    assert torch.equal(out, steered["base"].sequences)


def test_a_forward_pass_no_step_used_is_abandoned(steered, model):
    """A forward pass outside generate (the hook sends for it) and then generate: the unused
    request is cancelled, and every step uses the answer to its own hidden state."""
    client = SpyClient(steered["grpc"])
    proc = GoodtrieverLogitsProcessor(client, model, alpha=2.0)
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4]]))
    assert len(client.sent) == 1 and client.answers == []
    out = model.generate(torch.tensor([PROMPT]), logits_processor=[proc], max_new_tokens=NEW_TOKENS, **GEN)
    assert client.cancelled == 1
    assert proc.steps == NEW_TOKENS and len(client.answers) == NEW_TOKENS
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4]]))
    proc.remove()  # abandons the request the last forward pass sent
    assert client.cancelled == 2
    alone = SpyClient(steered["grpc"])
    again = GoodtrieverLogitsProcessor(alone, model, alpha=2.0, overlap=False)
    want = model.generate(torch.tensor([PROMPT]), logits_processor=[again], max_new_tokens=NEW_TOKENS, **GEN)
    again.remove()
    assert torch.equal(out, want)
    for a, b in zip(client.answers, alone.answers):
        np.testing.assert_array_equal(a.rows[0].tokens, b.rows[0].tokens)
        np.testing.assert_array_equal(a.rows[0].values, b.rows[0].values)


def test_batch_with_left_padding(steered, model):
    """Two prompts of different lengths, left-padded: one hidden row per sequence per step, and
    each row generates what it generates alone."""
    client = SpyClient(steered["grpc"])
    proc = GoodtrieverLogitsProcessor(client, model)
    short = [7, 3]
    ids = torch.tensor([PROMPT, [0, 0] + short])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    batch = model.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=4, **GEN)
    assert all(s.shape == (2, DIM) for s in client.sent)
    alone = [
        model.generate(torch.tensor([p]), logits_processor=[proc], max_new_tokens=4, **GEN)
        for p in (PROMPT, short)
    ]
    proc.remove()
    assert torch.equal(batch[0, 4:], alone[0][0, len(PROMPT):])
    assert torch.equal(batch[1, 4:], alone[1][0, len(short):])


def test_final_hidden_key_and_module_lookup(steered, model):
    client = SpyClient(steered["grpc"])
    assert find_key_module(model, "last_ffn_input") is model.model.layers[-1].post_attention_layernorm
    assert find_key_module(model, "final_hidden") is model.model.norm
    with pytest.raises(ValueError, match="unknown key type"):
        find_key_module(model, "embeddings")
    proc = GoodtrieverLogitsProcessor(client, model, key_type="final_hidden", send_f16=True)
    out = model.generate(torch.tensor([PROMPT]), logits_processor=[proc], max_new_tokens=2, **GEN)
    proc.remove()
    _, finals, _ = manual_keys(model, out)
    # Sent as f16: compare at f16 precision.
    np.testing.assert_allclose(client.sent[0][0], finals[0, len(PROMPT) - 1].numpy(), rtol=2e-3, atol=2e-3)


def test_apply_bias_torch_equals_numpy(steered):
    """The torch application of a sparse answer equals the numpy one, in every mode."""
    client = Client(steered["grpc"])
    rng = np.random.default_rng(5)
    hidden = rng.normal(0, 1, size=(3, DIM)).astype(np.float32)
    logits = rng.normal(0, 3, size=(3, VOCAB)).astype(np.float32)
    for mode in ("ensemble", "toxic-only", "knn-lm"):
        bias = client.adjust(hidden, mode=mode)
        want = apply_bias(logits, bias)
        got = apply_bias_torch(torch.from_numpy(logits), bias).numpy()
        assert np.array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5)


def test_a_store_from_another_model_is_refused(steered):
    """A model whose hidden size differs from the stores' is refused at construction."""
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=2 * DIM, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, attn_implementation="eager",
        )
    ).eval()
    with pytest.raises(ValueError, match="hidden size"):
        GoodtrieverLogitsProcessor(Client(steered["grpc"]), other)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("filter_p", [0.05, 0.5, 0.9, 0.999])
def test_partial_nucleus_equals_the_sorted_one(seed, filter_p):
    """The processor's nucleus mask (torch in, torch out) keeps exactly the tokens that
    `nucleus_filter` keeps on each row, ties (to the smaller token id) included, on small and
    large vocabularies; tests/test_apply.py checks `nucleus_filter` against a full stable sort."""
    from goodtriever_client import log_softmax, nucleus_filter
    from goodtriever_client.hf import _nucleus_drop

    rng = np.random.default_rng(seed)
    for vocab, scale in ((VOCAB, 1.0), (5000, 4.0)):
        # Rounded logits: many exact ties, also at the nucleus boundary.
        z = np.round(rng.normal(0, scale, size=(3, vocab)) * 2) / 2
        l = log_softmax(z).astype(np.float32)
        drop = _nucleus_drop(torch.from_numpy(l), filter_p).numpy()
        for i in range(3):
            want = np.isneginf(nucleus_filter(l[i].astype(np.float64), filter_p))
            assert np.array_equal(drop[i], want), (vocab, i, int(drop[i].sum()), int(want.sum()))
