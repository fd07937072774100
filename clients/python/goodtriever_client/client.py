"""The gRPC client: packing arrays for the wire, unpacking answers, applying a sparse bias.

Tensors travel as packed little-endian bytes (the protocol's `Tensor`), so hidden states are
sent without per-element encoding; float16 arrays are sent as f16 (half the bytes), anything
else as f32. The sparse answer is applied on the client exactly as the server's dense form
computes it (docs/architecture.md §1): log_softmax, base nucleus at `filter_p`, times `scale`, plus the
bias, log_softmax again.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
import numpy.typing as npt

from ._proto import goodtriever_pb2 as pb
from ._proto import goodtriever_pb2_grpc as pb_grpc

MODES = {
    "ensemble": pb.MODE_ENSEMBLE,
    "toxic-only": pb.MODE_TOXIC_ONLY,
    "knn-lm": pb.MODE_KNN_LM,
}
_MODE_NAMES = {v: k for k, v in MODES.items()}

_OVERRIDE_KEYS = (
    "alpha", "temperature", "k", "filter_p", "mode", "lam", "gate", "gate_neighbours", "prior",
    "skip", "skip_ratio", "skip_in_nucleus", "reuse", "reuse_radius",
)

# What `adjust` answers: a sparse `Bias`, or dense log-probabilities [B, V].
Answer = Union["Bias", npt.NDArray[np.float32]]
# An array the client sends: numpy, a torch tensor (detached and moved to the CPU), or anything
# `np.asarray` takes. torch is not imported, so its tensors are typed as `Any`.
ArrayLike = Union[npt.ArrayLike, Any]
Metadata = Sequence[Tuple[str, str]]


class GoodtrieverError(Exception):
    """An RPC failed. `code` is the `grpc.StatusCode`, `details` the server's sentence."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def wrap(cls, err: grpc.RpcError) -> "GoodtrieverError":
        return cls(err.code(), err.details() or "")


@dataclass
class BiasRow:
    """One row of a sparse answer.

    kind "bias": add `values` to the listed `tokens` after scaling the filtered log-probs by
    `scale`. kind "mixture" (kNN-LM mode): `values` are ln q of the kNN distribution; the
    answer is ln((1 - lam) * p + lam * q).
    """

    kind: str
    scale: float
    lam: float
    tokens: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]


@dataclass
class Bias:
    """A sparse answer for a batch: one `BiasRow` per row plus the parameters it was made with."""

    rows: List[BiasRow]
    filter_p: float
    vocab_size: int
    step: int = 0
    params: Dict[str, Any] = field(default_factory=dict)
    # Time the server's engine spent on this answer; a round trip minus this is transport cost.
    engine_micros: int = 0
    # Rows answered from their last step's neighbours' successors instead of a search (reuse).
    rows_reused: int = 0


def _to_numpy(x: ArrayLike) -> npt.NDArray[Any]:
    """numpy arrays pass through; torch tensors are detached and moved to the CPU."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        t = x.detach()
        if str(t.dtype) in ("torch.bfloat16",):
            t = t.float()
        return np.asarray(t.cpu().numpy())
    return np.asarray(x)


def _pack(x: ArrayLike, what: str, allow_f16: bool = True) -> pb.Tensor:
    a = _to_numpy(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what} must be 1-D [D] or 2-D [B, D], got shape {a.shape}")
    if a.dtype == np.float16 and allow_f16:
        data, dtype = np.ascontiguousarray(a, dtype="<f2").tobytes(), pb.D_TYPE_F16
    else:
        data, dtype = np.ascontiguousarray(a, dtype="<f4").tobytes(), pb.D_TYPE_F32
    return pb.Tensor(data=data, dtype=dtype, rows=a.shape[0])


def _overrides(opts: Dict[str, Any]) -> Optional[pb.Overrides]:
    unknown = set(opts) - set(_OVERRIDE_KEYS)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; use {list(_OVERRIDE_KEYS)}")
    if not any(v is not None for v in opts.values()):
        return None
    o = pb.Overrides()
    for key in ("alpha", "temperature", "filter_p", "gate", "prior", "skip", "skip_ratio", "reuse",
                "reuse_radius"):
        if opts.get(key) is not None:
            setattr(o, key, float(opts[key]))
    for key in ("k", "gate_neighbours"):
        if opts.get(key) is not None:
            setattr(o, key, int(opts[key]))
    if opts.get("skip_in_nucleus") is not None:
        o.skip_in_nucleus = bool(opts["skip_in_nucleus"])
    if opts.get("lam") is not None:
        o.__setattr__("lambda", float(opts["lam"]))
    if opts.get("mode") is not None:
        if opts["mode"] not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {opts['mode']!r}")
        o.mode = MODES[opts["mode"]]
    return o


def _params_dict(p: pb.Params) -> Dict[str, Any]:
    return {
        "alpha": p.alpha,
        "temperature": p.temperature,
        "k": p.k,
        "filter_p": p.filter_p,
        "mode": _MODE_NAMES.get(p.mode, "unspecified"),
        "lam": getattr(p, "lambda"),
        "gate": p.gate,
        "gate_neighbours": p.gate_neighbours,
        "prior": p.prior,
        "skip": p.skip,
        "skip_ratio": p.skip_ratio,
        "skip_in_nucleus": p.skip_in_nucleus,
        "reuse": p.reuse,
        "reuse_radius": p.reuse_radius,
    }


def _bias_row(r: pb.SparseRow) -> BiasRow:
    # Tokens and values arrive packed (little-endian u32 and f32): one copy each, no per-element
    # decoding.
    if len(r.tokens) % 4 or len(r.tokens) != len(r.values):
        raise GoodtrieverError(
            grpc.StatusCode.INTERNAL,
            f"malformed sparse row from the server: {len(r.tokens)} token bytes, "
            f"{len(r.values)} value bytes",
        )
    return BiasRow(
        kind="mixture" if r.kind == pb.SparseRow.KIND_MIXTURE else "bias",
        scale=r.scale,
        lam=getattr(r, "lambda"),
        tokens=np.frombuffer(r.tokens, dtype="<u4").astype(np.int64),
        values=np.frombuffer(r.values, dtype="<f4").astype(np.float32),
    )


def _unpack(resp: pb.AdjustResponse) -> Answer:
    if resp.rows:
        rows = [_bias_row(r) for r in resp.rows]
        return Bias(
            rows=rows,
            filter_p=resp.params.filter_p,
            vocab_size=resp.vocab_size,
            step=resp.step,
            params=_params_dict(resp.params),
            engine_micros=resp.engine_micros,
            rows_reused=resp.rows_reused,
        )
    return np.frombuffer(resp.log_probs, dtype="<f4").reshape(resp.num_rows, resp.vocab_size)


def _request(
    hidden: ArrayLike,
    logits: Optional[ArrayLike],
    form: Optional[str],
    opts: Dict[str, Any],
    step: int = 0,
    emitted_tokens: Optional[ArrayLike] = None,
    continued_rows: Optional[Sequence[int]] = None,
) -> pb.AdjustRequest:
    req = pb.AdjustRequest(hidden=_pack(hidden, "hidden"), step=step)
    if emitted_tokens is not None:
        req.emitted_tokens.extend(int(t) for t in np.asarray(_to_numpy(emitted_tokens)).reshape(-1))
    if continued_rows is not None:
        req.continued_rows.extend(int(r) for r in continued_rows)
    if logits is not None:
        req.logits.CopyFrom(_pack(logits, "logits"))
    if form is not None:
        req.form = {"sparse": pb.RESPONSE_FORM_SPARSE, "dense": pb.RESPONSE_FORM_DENSE}[form]
    o = _overrides(opts)
    if o is not None:
        req.overrides.CopyFrom(o)
    return req


class Client:
    """A connection to `goodtriever serve`.

    `target` is host:port, or unix:PATH for a server started with `--addr unix:PATH`.
    `admin_token` is sent with write RPCs (AddExamples, AddTexts).
    `root_certificates` (PEM bytes) switches to TLS. `timeout` bounds each unary call.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        admin_token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        timeout: Optional[float] = 30.0,
        max_message_bytes: int = 256 << 20,
    ) -> None:
        options: List[Tuple[str, Union[int, str]]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if target.startswith("unix:"):
            # grpcio sends the socket path as the HTTP/2 :authority, which is not a valid
            # authority; the server's HTTP/2 stack resets such streams.
            options.append(("grpc.default_authority", "localhost"))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        # The generated stub has no annotations: its methods are typed at the call sites.
        self._stub: Any = pb_grpc.GoodtrieverStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = [("authorization", f"Bearer {admin_token}")] if admin_token else []
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, metadata: Metadata = ()) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=list(metadata))
        except grpc.RpcError as err:
            raise GoodtrieverError.wrap(err) from None

    def info(self) -> pb.InfoResponse:
        """Stores (rows, segments, provenance), model fingerprint, key type, defaults, limits."""
        info: pb.InfoResponse = self._call(self._stub.Info, pb.InfoRequest())
        return info

    def adjust(
        self,
        hidden: ArrayLike,
        logits: Optional[ArrayLike] = None,
        *,
        form: Optional[str] = None,
        alpha: Optional[float] = None,
        temperature: Optional[float] = None,
        k: Optional[int] = None,
        filter_p: Optional[float] = None,
        mode: Optional[str] = None,
        lam: Optional[float] = None,
        gate: Optional[float] = None,
        gate_neighbours: Optional[int] = None,
        prior: Optional[float] = None,
        skip: Optional[float] = None,
        skip_ratio: Optional[float] = None,
        skip_in_nucleus: Optional[bool] = None,
    ) -> Answer:
        """One batch. Without logits: a sparse `Bias` (apply it with `apply_bias`). With logits:
        the adjusted log-probabilities [B, V] (-inf where filtered). Every keyword overrides the
        server's default for this call: `gate` (0..1) scales each row's alpha by how near its
        context lies to the toxic store, `prior` (0 off) corrects each store's expert by its
        own next-token frequencies, `skip` (0 off; needs logits) leaves rows unsearched and
        unbiased where the base distribution gives less than `skip` to tokens that lean toxic
        by more than `skip_ratio` (counted inside the rule's `filter_p` nucleus with
        `skip_in_nucleus=True`; docs/architecture.md §1)."""
        opts = dict(
            alpha=alpha, temperature=temperature, k=k, filter_p=filter_p, mode=mode, lam=lam,
            gate=gate, gate_neighbours=gate_neighbours, prior=prior, skip=skip,
            skip_ratio=skip_ratio, skip_in_nucleus=skip_in_nucleus,
        )
        req = _request(hidden, logits, form, opts)
        return _unpack(self._call(self._stub.Adjust, req))

    def explain(
        self,
        hidden: ArrayLike,
        logits: ArrayLike,
        *,
        top: Optional[int] = None,
        rows: Optional[int] = None,
        context_bytes: Optional[int] = None,
        form: Optional[str] = None,
        alpha: Optional[float] = None,
        temperature: Optional[float] = None,
        k: Optional[int] = None,
        filter_p: Optional[float] = None,
        mode: Optional[str] = None,
        lam: Optional[float] = None,
        gate: Optional[float] = None,
        gate_neighbours: Optional[int] = None,
        prior: Optional[float] = None,
        skip: Optional[float] = None,
        skip_ratio: Optional[float] = None,
        skip_in_nucleus: Optional[bool] = None,
    ) -> "Explained":
        """`adjust` with an explanation of every row: the tokens the control pushed down and
        up the most, each with the store rows behind it (store, segment, row, distance,
        weight, and the source text around the row when its store records one). `logits` are
        required (the base log-probabilities). Returns the usual answer (`.answer`: a `Bias`
        or the [B, V] log-probabilities, as `adjust` would) and `.explanations`, one
        `pb.StepExplanation` per row."""
        if logits is None:
            raise ValueError("explain needs the logits: the base log-probabilities come from them")
        opts = dict(
            alpha=alpha, temperature=temperature, k=k, filter_p=filter_p, mode=mode, lam=lam,
            gate=gate, gate_neighbours=gate_neighbours, prior=prior, skip=skip,
            skip_ratio=skip_ratio, skip_in_nucleus=skip_in_nucleus,
        )
        req = _request(hidden, logits, form, opts)
        for name, value in (("top", top), ("rows", rows), ("context_bytes", context_bytes)):
            if value is not None:
                if value < 0:
                    raise ValueError(f"{name} must be >= 0, got {value}")
                setattr(req.explain, name, int(value))
        # An empty ExplainOptions still asks for an explanation: mark the field present.
        req.explain.SetInParent()
        resp = self._call(self._stub.Adjust, req)
        return Explained(answer=_unpack(resp), explanations=list(resp.explanations))

    def adjust_future(
        self,
        hidden: ArrayLike,
        logits: Optional[ArrayLike] = None,
        *,
        form: Optional[str] = None,
        alpha: Optional[float] = None,
        temperature: Optional[float] = None,
        k: Optional[int] = None,
        filter_p: Optional[float] = None,
        mode: Optional[str] = None,
        lam: Optional[float] = None,
        gate: Optional[float] = None,
        gate_neighbours: Optional[int] = None,
        prior: Optional[float] = None,
        skip: Optional[float] = None,
        skip_ratio: Optional[float] = None,
        skip_in_nucleus: Optional[bool] = None,
    ) -> "PendingAdjust":
        """`adjust` without waiting: the request is sent now and `result()` on the returned
        object waits for the answer, so the caller can compute meanwhile (the transformers
        processor sends from its hook and runs the rest of the model's forward pass while the
        server searches). Bad arguments raise here; a refused call raises from `result()`."""
        opts = dict(
            alpha=alpha, temperature=temperature, k=k, filter_p=filter_p, mode=mode, lam=lam,
            gate=gate, gate_neighbours=gate_neighbours, prior=prior, skip=skip,
            skip_ratio=skip_ratio, skip_in_nucleus=skip_in_nucleus,
        )
        req = _request(hidden, logits, form, opts)
        return PendingAdjust(self._stub.Adjust.future(req, timeout=self.timeout))

    def session(self, **overrides: Any) -> "Session":
        """A streaming session for one generation: one `step()` per decoding step. Overrides
        apply to every step; `reuse=MIN` (with `reuse_radius`) lets the server answer a row from
        its last step's neighbours' successors (streams only; see `Session.step`)."""
        return Session(self, overrides)

    def add_examples(
        self,
        store: str,
        hidden: ArrayLike,
        next_tokens: ArrayLike,
        *,
        source: str = "",
        tag: str = "",
    ) -> pb.AddExamplesResponse:
        """Appends (hidden state, next token) rows to `store` ("toxic" or "nontoxic"). Durable
        when this returns; later adjust calls see the rows."""
        tokens = np.asarray(_to_numpy(next_tokens)).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
            raise ValueError("next_tokens must be token ids in [0, 2**32)")
        req = pb.AddExamplesRequest(
            store=store,
            hidden=_pack(hidden, "hidden"),
            next_tokens=[int(t) for t in tokens],
            source=source,
            tag=tag,
        )
        resp: pb.AddExamplesResponse = self._call(self._stub.AddExamples, req, self._admin)
        return resp

    def add_texts(
        self, store: str, texts: Sequence[str], *, source: str = "", tag: str = ""
    ) -> pb.AddTextsResponse:
        """Appends texts to `store`; the server computes the keys with its own model."""
        if isinstance(texts, str):
            texts = [texts]
        req = pb.AddTextsRequest(store=store, texts=list(texts), source=source, tag=tag)
        resp: pb.AddTextsResponse = self._call(self._stub.AddTexts, req, self._admin)
        return resp


@dataclass
class Explained:
    """An explained Adjust: the answer as `Client.adjust` returns it, and one
    `pb.StepExplanation` per row (`pushed_down`, `pushed_up`: `pb.TokenMove`s with their
    `rows`, each a `pb.ExplainedRow` whose `source` holds the text around it when
    `HasField("source")`)."""

    answer: Answer
    explanations: List[pb.StepExplanation]


class PendingAdjust:
    """An `Adjust` call in flight, from `Client.adjust_future`."""

    def __init__(self, future: "grpc.Future[pb.AdjustResponse]") -> None:
        self._future = future

    def result(self, timeout: Optional[float] = None) -> Answer:
        """Waits for the answer (at most `timeout` seconds more, if given): what `adjust` would
        have returned, or the `GoodtrieverError` it would have raised."""
        try:
            return _unpack(self._future.result(timeout=timeout))
        except grpc.RpcError as err:
            raise GoodtrieverError.wrap(err) from None
        except grpc.FutureCancelledError:
            raise GoodtrieverError(grpc.StatusCode.CANCELLED, "the call was cancelled") from None
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"no answer within {timeout} s; the call is still in flight") from None

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Abandons the call; True if it was still in flight."""
        return self._future.cancel()


_END = object()


class Session:
    """One bidirectional AdjustStream: each `step()` sends one message and waits for its answer.

    Use it as a context manager, or call `close()` when the generation is done.
    """

    def __init__(self, client: Client, overrides: Dict[str, Any]) -> None:
        _overrides(overrides)  # validate early
        self._opts = overrides
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._step = 0
        self._lock = threading.Lock()
        self._responses: Iterator[pb.AdjustResponse] = client._stub.AdjustStream(self._requests())
        self._closed = False
        # Rows of the last step, and of all steps, answered from reused neighbours (reuse).
        self.rows_reused = 0
        self.total_rows_reused = 0

    def _requests(self) -> Iterator[object]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item

    def step(
        self,
        hidden: ArrayLike,
        logits: Optional[ArrayLike] = None,
        *,
        form: Optional[str] = None,
        emitted_tokens: Optional[ArrayLike] = None,
        continued_rows: Optional[Sequence[int]] = None,
    ) -> Answer:
        """One decoding step. With `reuse` among the session's overrides, pass from the second
        step on `emitted_tokens`: the token each row's sequence emitted after the previous step
        (one per row), and, when some sequences finished, `continued_rows`: which rows of the
        previous step these rows continue (ascending). `rows_reused` then says how many rows
        the server answered from their last neighbours' successors instead of a search."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this session is closed")
            req = _request(hidden, logits, form, self._opts, step=self._step,
                           emitted_tokens=emitted_tokens, continued_rows=continued_rows)
            self._queue.put(req)
            try:
                resp = next(self._responses)
            except grpc.RpcError as err:
                self._closed = True
                raise GoodtrieverError.wrap(err) from None
            if resp.step != self._step:
                raise RuntimeError(f"answer for step {resp.step} arrived for step {self._step}")
            self._step += 1
            self.rows_reused = resp.rows_reused
            self.total_rows_reused += resp.rows_reused
            return _unpack(resp)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError:
                pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_softmax(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Row-wise log-softmax in float64; -inf entries stay -inf."""
    x = np.asarray(z, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    if np.any(np.isneginf(m)):
        raise ValueError("a row of logits is all -inf: there is no distribution to adjust")
    out: npt.NDArray[np.float64] = x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))
    return out


# The nucleus's histogram: buckets 1/64 nat wide below the largest log-probability, over 48
# nats, and one last bucket for everything further down (as the server's).
_BUCKETS_PER_NAT = 64.0
_BUCKETS = 48 * 64 + 1


def nucleus_filter(l: npt.NDArray[Any], filter_p: float) -> npt.NDArray[Any]:
    """The base nucleus of docs/architecture.md §1 on normalised log-probs (one row): keep rank r iff r = 0
    or the mass of the higher ranks is below filter_p; ties go to the smaller token id. The
    removed tokens become -inf; the dtype is kept. See `nucleus_keep`."""
    if filter_p >= 1.0:
        return l
    l = np.asarray(l)
    return np.where(nucleus_keep(l, filter_p), l, -np.inf).astype(l.dtype, copy=False)


def nucleus_keep(l: npt.NDArray[Any], filter_p: float) -> npt.NDArray[np.bool_]:
    """The tokens the base nucleus keeps in normalised log-probs `l` (one row), as a bool mask:
    the one implementation of the rule in this package (`nucleus_filter` and the transformers
    processor both use it), the same as the server's `rule::nucleus_filter`.

    Nothing is sorted but the tokens near the cut: a histogram of probability mass over
    log-probability buckets finds the bucket where the cumulative mass reaches filter_p, and
    only that bucket is ranked (a stable sort of a 49k vocabulary took ~6 ms a row)."""
    l = np.asarray(l)
    if filter_p >= 1.0:
        return np.ones(l.shape, dtype=bool)
    top = np.max(l)
    if np.isneginf(top):
        return np.zeros(l.shape, dtype=bool)
    l64 = l.astype(np.float64)
    p = np.exp(l64)
    # Non-increasing in l, so every token of a bucket ranks above every token of a later one;
    # -inf lands in the last bucket.
    bucket = np.minimum((top - l64) * _BUCKETS_PER_NAT, _BUCKETS - 1).astype(np.int64)
    mass = np.bincount(bucket, weights=p, minlength=_BUCKETS)
    cum = np.cumsum(mass)
    cut = int(np.searchsorted(cum, filter_p, side="left"))
    if cut >= _BUCKETS:
        return np.ones(l.shape, dtype=bool)  # rounding left the total below filter_p: keep all
    idx = np.flatnonzero(bucket == cut)
    order = idx[np.lexsort((idx, -l64[idx]))]
    pm = p[order]
    before = (cum[cut - 1] if cut else 0.0) + np.cumsum(pm) - pm
    keep_cut = before < filter_p
    keep_cut[0] = True
    keep: npt.NDArray[np.bool_] = bucket < cut
    keep[order[keep_cut]] = True
    return keep


def apply_bias(logits: ArrayLike, bias: Bias) -> npt.NDArray[np.float32]:
    """The dense answer from raw logits [B, V] (or [V]) and a sparse `Bias`: normalised
    adjusted log-probabilities, float32, -inf where filtered."""
    z = _to_numpy(logits)
    single = z.ndim == 1
    z = np.atleast_2d(z)
    if z.shape[0] != len(bias.rows):
        raise ValueError(f"logits have {z.shape[0]} rows, the bias {len(bias.rows)}")
    out = np.empty(z.shape, dtype=np.float32)
    for i, row in enumerate(bias.rows):
        l = nucleus_filter(log_softmax(z[i]), bias.filter_p)
        if row.kind == "bias":
            s = l * row.scale if row.scale != 1.0 else l.copy()
            s[row.tokens] += row.values
        else:
            # values are ln q of the kNN distribution: mix in log space.
            with np.errstate(divide="ignore"):
                s = np.log1p(-row.lam) + l
                s[row.tokens] = np.logaddexp(s[row.tokens], np.log(row.lam) + row.values)
        out[i] = log_softmax(s)
    return out[0] if single else out
