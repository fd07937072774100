"""Hugging Face transformers integration: a `LogitsProcessor` that asks goodtriever at every
decoding step, with a forward hook that captures the key hidden state.

The datastores hold one particular hidden state of the model (the server's `Info` says which):
`last_ffn_input`, the normalised input of the last block's MLP (the output of the last layer's
post-attention norm, the paper's choice), or `final_hidden`, the output of the final norm. The
processor hooks that module, sends the last position of each row from the hook itself (so the
server searches while the model finishes its forward pass), and applies the sparse answer to
the scores::

    proc = GoodtrieverLogitsProcessor(Client("127.0.0.1:50051"), model)
    out = model.generate(**inputs, logits_processor=[proc])

The returned scores are the adjusted normalised log-probabilities (-inf where the base nucleus
removed a token). transformers runs user processors after its own penalties and before its
sampling warpers, so temperature, top-k and top-p apply after the control, as in the paper.

Tested with transformers 4.47.1 on torch 1.13.1 (Debian's python3-torch). With that torch on
Python 3.11, pass `synced_gpus=False` to `generate` (see the README).
"""

from __future__ import annotations

import math
import time
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
from transformers import LogitsProcessor

from .client import Bias, Client, PendingAdjust, nucleus_keep

# Where the key modules live in common architectures, as attribute paths from the model.
_LAST_FFN_INPUT = [
    "model.layers.-1.post_attention_layernorm",  # llama, mistral, qwen2, SmolLM, gemma
    "gpt_neox.layers.-1.post_attention_layernorm",
    "transformer.h.-1.ln_2",  # gpt2
    "model.decoder.layers.-1.final_layer_norm",  # opt
]
_FINAL_HIDDEN = [
    "model.norm",
    "gpt_neox.final_layer_norm",
    "transformer.ln_f",
    "model.decoder.final_layer_norm",
]


def _resolve(model: torch.nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def find_key_module(model: torch.nn.Module, key_type: str) -> torch.nn.Module:
    """The module whose output is the key hidden state of `key_type` in `model`."""
    candidates = {"last_ffn_input": _LAST_FFN_INPUT, "final_hidden": _FINAL_HIDDEN}.get(key_type)
    if candidates is None:
        raise ValueError(f"unknown key type {key_type!r}: expected last_ffn_input or final_hidden")
    for path in candidates:
        try:
            module: torch.nn.Module = _resolve(model, path)
            return module
        except (AttributeError, IndexError, TypeError):
            continue
    raise ValueError(
        f"cannot find the {key_type} module of {type(model).__name__}; pass key_module= "
        "(the module whose output is the key hidden state)"
    )


def _hidden_size(model: torch.nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return int(size) if size else None


def _nucleus_drop(l: torch.Tensor, filter_p: float) -> torch.Tensor:
    """The tokens the base nucleus removes from normalised log-probs `l` [B, V], as a bool
    tensor on `l`'s device: the client's `nucleus_keep` (the server's rule, ties to the smaller
    token id) on each row, computed in numpy on the CPU."""
    rows = l.detach().cpu().double().numpy()  # exact for every float dtype
    drop = np.stack([~nucleus_keep(row, filter_p) for row in rows])
    return torch.from_numpy(drop).to(l.device)


def apply_bias_torch(scores: torch.Tensor, bias: Bias) -> torch.Tensor:
    """`apply_bias` on torch tensors, on the scores' device: log_softmax, base nucleus at
    `filter_p`, scale, bias (or kNN-LM mixture), log_softmax."""
    z = scores.float()
    l = torch.log_softmax(z, dim=-1)
    if bias.filter_p < 1.0:
        l = l.masked_fill(_nucleus_drop(l, bias.filter_p), float("-inf"))
    out = torch.empty_like(l)
    for i, row in enumerate(bias.rows):
        tokens = torch.as_tensor(row.tokens, device=l.device, dtype=torch.long)
        values = torch.as_tensor(row.values, device=l.device, dtype=torch.float32)
        if row.kind == "bias":
            s = l[i] * row.scale if row.scale != 1.0 else l[i].clone()
            s.index_add_(0, tokens, values)
        else:
            # values are ln q of the kNN distribution: ln((1 - lam) p + lam q) in log space.
            s = l[i] + math.log1p(-row.lam)
            s[tokens] = torch.logaddexp(s[tokens], math.log(row.lam) + values)
        out[i] = torch.log_softmax(s, dim=-1)
    return out.to(scores.dtype)


class GoodtrieverLogitsProcessor(LogitsProcessor):
    """Steers `model.generate` with a goodtriever server.

    `key_type` defaults to the server's; `key_module` overrides the module lookup for
    architectures not listed here. Overrides (`alpha`, `k`, `mode`, ...) apply to every step.
    `send_f16` halves the bytes on the wire. Call `remove()` to detach the hook when done with
    the model.

    With `overlap` (the default) the hook sends the hidden state the moment its module has
    computed it, and the server searches while the model finishes its forward pass (the last
    MLP, the final norm, the LM head); the processor then only waits for what is left of the
    round trip. Without it, the request is sent when transformers calls the processor. The
    answers are the same. With `overlap` the hook calls the client, which `torch.compile`
    cannot trace: for a compiled model pass `overlap=False`, whose hook only keeps a tensor.

    After a generation, `step_seconds` holds the wall time each step spent in the processor
    and its hook (copy to the CPU, sending, waiting for the answer, applying the bias) and
    `engine_micros` the server's engine time of each step; `reset_timings()` clears both.
    """

    def __init__(
        self,
        client: Client,
        model: torch.nn.Module,
        *,
        key_type: Optional[str] = None,
        key_module: Optional[torch.nn.Module] = None,
        send_f16: bool = False,
        overlap: bool = True,
        **overrides: Any,
    ) -> None:
        self.client = client
        self.overrides = overrides
        self.send_f16 = send_f16
        self.overlap = overlap
        if key_type is None:
            info = client.info().model
            key_type = info.key_type
            hidden_size = _hidden_size(model)
            if hidden_size is not None and info.hidden_size and hidden_size != info.hidden_size:
                raise ValueError(
                    f"the model's hidden size is {hidden_size} but the server's stores hold "
                    f"{info.hidden_size}-dimensional keys: they come from another model"
                )
        self.key_type = key_type
        module = key_module if key_module is not None else find_key_module(model, key_type)
        self._captured: Optional[torch.Tensor] = None
        # The request the hook sent for the captured rows (overlap), or why it could not send.
        self._pending: Optional[PendingAdjust] = None
        self._send_error: Optional[BaseException] = None
        self._hook_seconds = 0.0
        self._handle = module.register_forward_hook(self._hook)
        self.steps = 0
        self.step_seconds: List[float] = []
        self.engine_micros: List[int] = []

    def reset_timings(self) -> None:
        self.step_seconds.clear()
        self.engine_micros.clear()

    def _wire(self, hidden: torch.Tensor) -> np.ndarray:
        return np.asarray(hidden.to(torch.float16 if self.send_f16 else torch.float32).cpu().numpy())

    def _hook(
        self,
        module: torch.nn.Module,
        inputs: Tuple[torch.Tensor, ...],
        output: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
    ) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._captured = hidden[:, -1, :].detach()
        if not self.overlap:
            return
        start = time.perf_counter()
        # A forward pass that no processor call followed leaves an answer nobody will read.
        self._discard_pending()
        try:
            self._pending = self.client.adjust_future(self._wire(self._captured), **self.overrides)
        except Exception as err:  # raised where the answer is needed, not inside the forward
            self._send_error = err
        self._hook_seconds = time.perf_counter() - start

    def _discard_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending, self._send_error = None, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        hidden = self._captured
        if hidden is None:
            raise RuntimeError("the key hook saw no forward pass: is the processor attached to this model?")
        if hidden.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"captured {hidden.shape[0]} hidden rows for {scores.shape[0]} score rows"
            )
        start = time.perf_counter()
        pending, error, hook_seconds = self._pending, self._send_error, self._hook_seconds
        self._captured, self._pending, self._send_error, self._hook_seconds = None, None, None, 0.0
        if error is not None:
            raise error
        answer = (
            pending.result()
            if pending is not None
            else self.client.adjust(self._wire(hidden), **self.overrides)
        )
        if not isinstance(answer, Bias):
            raise RuntimeError("the server answered the dense form to a sparse request")
        bias = answer
        width = scores.shape[-1]
        for row in bias.rows:
            if len(row.tokens) and int(row.tokens.max()) >= width:
                raise RuntimeError(
                    f"the server answered token {int(row.tokens.max())} but the scores have only "
                    f"{width} columns: its stores come from a model with a larger vocabulary"
                )
        out = apply_bias_torch(scores, bias)
        self.steps += 1
        self.step_seconds.append(hook_seconds + time.perf_counter() - start)
        self.engine_micros.append(bias.engine_micros)
        return out

    def remove(self) -> None:
        """Detaches the hook (and abandons a request it sent that no step used)."""
        self._handle.remove()
        self._discard_pending()
