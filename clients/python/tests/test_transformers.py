"""The transformers integration on a tiny randomly initialised llama (no download): the hook
captures the last layer's post-attention-norm output, every generation step is sent to the
server, and the scores generate() sees are the server's dense answer. Skipped when torch or
transformers are not installed (CI does not install them)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from goodtriever_client import Client, GoodtrieverLogitsProcessor  # noqa: E402

from conftest import DIM, VOCAB  # noqa: E402


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
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_generate_is_steered_with_three_lines(server, model):
    client = Client(server.grpc)
    proc = GoodtrieverLogitsProcessor(client, model, alpha=2.0)
    prompt = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(
        prompt, logits_processor=[proc], max_new_tokens=6, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    proc.remove()
    assert proc.steps == 6
    assert out.sequences.shape[1] == prompt.shape[1] + 6

    # The first step's scores equal the server's dense answer for the captured key.
    captured = {}
    layer = model.model.layers[-1].post_attention_layernorm
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("h", o[:, -1, :]))
    with torch.no_grad():
        logits = model(prompt).logits[:, -1, :]
    handle.remove()
    dense = client.adjust(captured["h"].float().numpy(), logits.float().numpy(), alpha=2.0)
    got = out.scores[0].float().numpy()
    assert np.array_equal(np.isneginf(got), np.isneginf(dense))
    finite = np.isfinite(got)
    np.testing.assert_allclose(got[finite], dense[finite], atol=2e-4)
