"""Python client for the goodtriever decoding hook (`goodtriever serve`).

At every decoding step an engine sends the key hidden state of the last position and gets back
a sparse logit bias (a few hundred (token, bias) pairs) that steers generation away from text
resembling the server's toxic datastore and toward its non-toxic one::

    from goodtriever_client import Client, apply_bias
    client = Client("127.0.0.1:50051")
    bias = client.adjust(hidden)              # hidden: [B, D] float32/float16
    log_probs = apply_bias(logits, bias)      # logits: [B, V]

For Hugging Face transformers, `GoodtrieverLogitsProcessor` (in `goodtriever_client.hf`,
imported lazily so that torch is not needed otherwise) captures the hidden state with a
forward hook::

    proc = GoodtrieverLogitsProcessor(Client("127.0.0.1:50051"), model)
    out = model.generate(**inputs, logits_processor=[proc])
"""

from typing import Any

from .client import (
    Bias,
    BiasRow,
    Client,
    Explained,
    GoodtrieverError,
    PendingAdjust,
    Session,
    apply_bias,
    log_softmax,
    nucleus_filter,
)

__all__ = [
    "Bias",
    "BiasRow",
    "Client",
    "Explained",
    "GoodtrieverError",
    "GoodtrieverLogitsProcessor",
    "PendingAdjust",
    "Session",
    "apply_bias",
    "log_softmax",
    "nucleus_filter",
]


def __getattr__(name: str) -> Any:
    # torch and transformers are optional: import the integration only when it is asked for.
    if name == "GoodtrieverLogitsProcessor":
        from .hf import GoodtrieverLogitsProcessor

        return GoodtrieverLogitsProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
