"""The OpenAI-compatible HTTP API of `goodtriever serve --model ... --http ...`, driven with the
official `openai` package on the tiny model: completions, chat completions, streaming, n > 1,
the error cases (each answered with OpenAI's error shape, the server still serving after them),
the controlled answer equal to `goodtriever generate`'s for the same seed, and `explain` read
from the response objects' extension fields."""

import json
import subprocess

import httpx
import openai
import pytest

from conftest import TINY_NAME, start_http_server, stop_server

PROMPT = "hello the world"


@pytest.fixture(scope="module")
def http(binary, tiny_model, tiny_stores):
    served = start_http_server(binary, tiny_model, tiny_stores, "--http-batch-rows", "8", "--http-queue", "8")
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url=http.base_url, api_key="unused", max_retries=0, timeout=60)


def generate_cli(binary, model, stores, prompt, *, n, max_tokens, seed, top_p, alpha=None):
    """`goodtriever generate --json` with the server's settings (f32 weights, exact search,
    k 16, kNN temperature 10): the continuations, in sample order."""
    args = [
        str(binary), "generate", "--model", str(model), "--weights", "f32", "--prompt", prompt,
        "--num-samples", str(n), "--max-new-tokens", str(max_tokens), "--seed", str(seed),
        "--top-p", str(top_p), "--temperature", "1", "--json",
        "--k", "16", "--knn-temperature", "10", "--filter-p", "1", "--exact",
    ]
    if alpha != 0:
        args += ["--toxic", str(stores["toxic"]), "--nontoxic", str(stores["nontoxic"])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [json.loads(line)["continuation"] for line in out.splitlines() if line.strip()]


def test_completions_equal_goodtriever_generate(client, binary, tiny_model, tiny_stores):
    r = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=20, n=3, seed=7, top_p=0.9)
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert texts == generate_cli(binary, tiny_model, tiny_stores, PROMPT, n=3, max_tokens=20, seed=7, top_p=0.9)
    assert r.usage.completion_tokens >= 3 and r.usage.prompt_tokens > 0
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    # "alpha": 0 switches the control off: the bare model's samples.
    bare = client.completions.create(
        model=TINY_NAME, prompt=PROMPT, max_tokens=20, n=3, seed=7, top_p=0.9,
        extra_body={"goodtriever": {"alpha": 0}},
    )
    assert [c.text for c in bare.choices] == generate_cli(
        binary, tiny_model, tiny_stores, PROMPT, n=3, max_tokens=20, seed=7, top_p=0.9, alpha=0
    )


def test_chat_completions_and_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    r = client.chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=12, n=2, seed=3,
    )
    assert r.object == "chat.completion"
    assert len(r.choices) == 2
    assert all(c.message.role == "assistant" and isinstance(c.message.content, str) for c in r.choices)
    again = client.chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=12, n=2, seed=3,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_streaming_gives_the_same_text(client):
    kwargs = dict(model=TINY_NAME, prompt=PROMPT, max_tokens=24, n=2, seed=11)
    whole = client.completions.create(**kwargs)
    texts, finish, chunks = ["", ""], [None, None], 0
    for chunk in client.completions.create(stream=True, **kwargs):
        chunks += 1
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert chunks > 3
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]

    chat_kwargs = dict(model=TINY_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=2)
    whole = client.chat.completions.create(**chat_kwargs)
    text, roles = "", set()
    for chunk in client.chat.completions.create(stream=True, **chat_kwargs):
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.delta.role)
            text += c.delta.content or ""
    assert roles == {"assistant"}
    assert text == whole.choices[0].message.content


def test_errors_have_openai_shape_and_the_server_goes_on(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2, extra_body={"goodtriever": {"alpha": 1e9}})
    assert e.value.param == "goodtriever.params"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2, extra_body={"goodtriever": {"alhpa": 1}})
    # Malformed JSON and an oversized body, which the openai package cannot send: plain httpx.
    r = httpx.post(f"{http.base_url}/completions", content=b'{"model": "tiny", ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{http.base_url}/completions", json={"model": TINY_NAME, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    # Still serving.
    ok = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=3, seed=1)
    assert ok.usage.completion_tokens >= 1
    metrics = httpx.get(f"http://{http.metrics}/metrics").text
    assert 'goodtriever_http_requests_total{endpoint="completions",outcome="invalid"}' in metrics


def test_the_api_key_is_checked(binary, tiny_model, tiny_stores, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-python-test\n")
    served = start_http_server(binary, tiny_model, tiny_stores, "--api-key-file", str(key))
    try:
        bad = openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=served.base_url, api_key="sk-python-test", max_retries=0)
        assert good.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2).choices
    finally:
        stop_server(served)


def test_explain_rides_on_each_token_as_an_extension_field(client):
    kwargs = dict(model=TINY_NAME, prompt=PROMPT, max_tokens=8, seed=4, top_p=0.9)
    plain = client.completions.create(**kwargs)
    r = client.completions.create(**kwargs, extra_body={"goodtriever": {"explain": True}})
    # Explaining changes nothing of what is sampled.
    assert [c.text for c in r.choices] == [c.text for c in plain.choices]
    assert "goodtriever" not in (plain.choices[0].model_extra or {})
    steps = r.choices[0].model_extra["goodtriever"]["explanations"]
    assert len(steps) == r.usage.completion_tokens
    for step in steps:
        assert set(step) == {"pushed_down", "pushed_up", "chosen"}
        assert len(step["pushed_down"]) <= 5 and len(step["pushed_up"]) <= 5
        assert all(m["change"] < 0 for m in step["pushed_down"])
        assert all(m["change"] > 0 for m in step["pushed_up"])
        for m in step["pushed_down"] + step["pushed_up"]:
            assert len(m["rows"]) <= 3 and m["rows_total"] >= len(m["rows"])
            assert {e["store"] for e in m["experts"]} == {"toxic", "nontoxic"}
    assert any(m["rows"] for s in steps for m in s["pushed_down"] + s["pushed_up"])
    assert r.choices[0].to_dict()["goodtriever"]["explanations"] == steps

    # Streamed: each token's chunk carries its step, the same as the whole answer's.
    streamed = []
    for chunk in client.completions.create(stream=True, **kwargs, extra_body={"goodtriever": {"explain": {"top": 5}}}):
        for c in chunk.choices:
            extra = (c.model_extra or {}).get("goodtriever")
            if extra:
                streamed.append(extra["explanation"])
    assert [s["chosen"]["token"] for s in streamed] == [s["chosen"]["token"] for s in steps]
    assert [[m["token"] for m in s["pushed_down"]] for s in streamed] == [[m["token"] for m in s["pushed_down"]] for s in steps]

    # Bad options and explain with the control off are 400s naming the field.
    for extra in ({"explain": {"top": 0}}, {"explain": {"rowz": 1}}, {"explain": True, "alpha": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs, extra_body={"goodtriever": extra})
        assert e.value.param == "goodtriever.explain"
