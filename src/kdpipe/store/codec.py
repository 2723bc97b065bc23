"""Teacher-store codecs: the spec a manifest records, and the calls the writer and the reader make.

Two schemes: ``sorted-ans-v2`` (:mod:`kdpipe.store.codec_v2`, the default for new stores: entropy-coded, about
1.7 bytes per top-k entry on a real LM at k=64) and ``rowmax-pow4-v1`` (:mod:`kdpipe.store.codec_v1`: fixed-width,
row-aligned, about 3 bytes; every v1 store stays readable, and ``make_spec(..., scheme=codec_v1.SCHEME)`` still
writes one). The writer calls :func:`prepare` per example (checks the input and quantises it) and
:func:`encode_shard` once a shard is full; the reader opens each shard with :func:`open_shard` and decodes the
rows of any examples with :func:`decode`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdpipe.store import codec_v1, codec_v2
from kdpipe.store.codec_v1 import as_numpy

DEFAULT_SCHEME = codec_v2.SCHEME
SCHEMES = (codec_v1.SCHEME, codec_v2.SCHEME)
_FIELDS = {  # the spec keys each scheme records, besides vocab_size, k and scheme
    codec_v1.SCHEME: ("id_dtype", "logprob_bits"),
    codec_v2.SCHEME: ("step",),
}

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class CodecSpec:
    """What a store's manifest records about its encoding; JSON-serialisable via :meth:`to_dict`."""

    vocab_size: int
    k: int
    scheme: str = DEFAULT_SCHEME
    id_dtype: str | None = None  # v1: the id layout
    logprob_bits: int | None = None  # v1: bits per log-prob code
    step: float | None = None  # v2: the sqrt(p) quantiser step

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"need 1 <= k <= vocab_size, got k={self.k}, vocab_size={self.vocab_size}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unsupported codec scheme {self.scheme!r}; this reader knows {list(SCHEMES)}")
        unset = [f for f in _FIELDS[self.scheme] if getattr(self, f) is None]
        foreign = [f for s, fs in _FIELDS.items() if s != self.scheme for f in fs if getattr(self, f) is not None]
        if unset or foreign:
            raise ValueError(f"codec {self.scheme} needs {list(_FIELDS[self.scheme])} and no {foreign}; unset: {unset}")
        if self.scheme == codec_v1.SCHEME:
            codec_v1.check_layout(self.vocab_size, self.id_dtype, self.logprob_bits)
        elif not 0.0 < self.step < 0.5:
            raise ValueError(f"codec step must be in (0, 0.5), got {self.step}")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecSpec:
        scheme = d.get("scheme")
        if scheme not in _FIELDS:
            raise ValueError(f"unsupported codec scheme {scheme!r}; this reader knows {list(SCHEMES)}")
        names = ["vocab_size", "k", "scheme", *_FIELDS[scheme]]
        if set(d) != set(names):
            raise ValueError(f"codec spec {scheme} needs exactly the keys {names}, got {sorted(d)}")
        cast = {"vocab_size": int, "k": int, "scheme": str, "id_dtype": str, "logprob_bits": int, "step": float}
        return cls(**{key: cast[key](d[key]) for key in names})


def make_spec(
    vocab_size: int,
    k: int,
    scheme: str = DEFAULT_SCHEME,
    logprob_bits: int = codec_v1.DEFAULT_LOGPROB_BITS,
    step: float | None = None,
) -> CodecSpec:
    """The spec for a vocabulary and top-k under ``scheme`` (v1: narrowest ids, ``logprob_bits``-bit codes; v2:
    ``step``, by default :func:`kdpipe.store.codec_v2.default_step` for k)."""
    if scheme == codec_v1.SCHEME:
        return CodecSpec(int(vocab_size), int(k), scheme, codec_v1.id_dtype_for(int(vocab_size)), int(logprob_bits))
    return CodecSpec(
        int(vocab_size), int(k), scheme, step=float(step if step is not None else codec_v2.default_step(k))
    )


# --- writing -------------------------------------------------------------------------------------------------------


def prepare(
    spec: CodecSpec, topk_ids: ArrayLike, topk_logprobs: ArrayLike, tail_logprob: ArrayLike, label_logprob: ArrayLike
) -> dict[str, np.ndarray]:
    """One example's rows (ids [N, k], log-probs [N, k], tail [N], label [N]; torch or numpy), checked and
    quantised, for :func:`encode_shard`.

    Raises ValueError on NaN or +inf in any log-prob, ids outside ``[0, vocab_size)``, or wrong shapes.
    """
    ids, lp, tail, label = (as_numpy(a) for a in (topk_ids, topk_logprobs, tail_logprob, label_logprob))
    n = lp.shape[0] if lp.ndim == 2 else -1
    if ids.ndim != 2 or ids.shape != lp.shape or lp.shape[1] != spec.k or tail.shape != (n,) or label.shape != (n,):
        raise ValueError(
            f"expected ids and log-probs [N, {spec.k}], tail and label [N]; got {ids.shape}, {lp.shape}, "
            f"{tail.shape}, {label.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= spec.vocab_size):
        raise ValueError(f"token ids must lie in [0, {spec.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    for name, a in (("topk_logprobs", lp), ("tail_logprob", tail), ("label_logprob", label)):
        if np.isnan(a).any() or np.isposinf(a).any():
            raise ValueError(f"{name} holds NaN or +inf")
    if spec.scheme == codec_v1.SCHEME:
        return codec_v1.encode(spec, ids, lp, tail, label)
    return codec_v2.prepare(spec.vocab_size, spec.k, spec.step, ids, lp, tail, label)


def encode_shard(spec: CodecSpec, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A shard's arrays from its examples' :func:`prepare` output, in order; ``offsets`` [E + 1] gives each
    example's rows."""
    if spec.scheme == codec_v2.SCHEME:
        return codec_v2.encode_shard(spec.vocab_size, spec.k, spec.step, parts)
    lengths = [len(p["label"]) for p in parts]
    arrays = {key: np.concatenate([p[key] for p in parts], axis=0) for key in codec_v1.ARRAY_KEYS}
    return {**arrays, "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


# --- reading -------------------------------------------------------------------------------------------------------


@dataclass
class EncodedRows:
    """The still-encoded rows of one example, with what decoding them needs from their shard."""

    arrays: dict[str, np.ndarray]
    rows: int
    models: Any = None  # v2: the shard's entropy models

    @property
    def nbytes(self) -> int:
        return int(sum(np.asarray(a).nbytes for a in self.arrays.values()))


class Shard:
    """One shard file opened for reading (a ``safetensors`` handle): its offsets and models, loaded once."""

    def __init__(self, spec: CodecSpec, handle) -> None:
        self.spec, self.handle = spec, handle
        self.offsets = handle.get_tensor("offsets")
        self.models = None
        if spec.scheme == codec_v2.SCHEME:
            self.stream_offsets = handle.get_tensor("stream_offsets")
            self.models = codec_v2.load_models({key: handle.get_tensor(key) for key in codec_v2.MODEL_KEYS})

    def rows(self, local: int) -> EncodedRows:
        """The encoded rows of the shard's example number ``local`` (sliced from the memory-mapped file)."""
        start, stop = (int(x) for x in self.offsets[local : local + 2])
        if self.spec.scheme == codec_v2.SCHEME:
            a, b = (int(x) for x in self.stream_offsets[local : local + 2])
            arrays = {
                "stream": self.handle.get_slice("stream")[a:b],
                "label": self.handle.get_slice("label")[start:stop],
            }
            return EncodedRows(arrays, stop - start, self.models)
        return EncodedRows({key: self.handle.get_slice(key)[start:stop] for key in codec_v1.ARRAY_KEYS}, stop - start)


def open_shard(spec: CodecSpec, handle) -> Shard:
    return Shard(spec, handle)


def decode(spec: CodecSpec, parts: list[EncodedRows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of several examples, concatenated in order: ids int64 [N, k], log-probs f32 [N, k], tail f32
    [N], label f32 [N]. Top-k and tail come back renormalised together; the label log-prob as stored (float16).
    v2 gives each row's entries in id order, v1 in the order they were written."""
    if spec.scheme == codec_v1.SCHEME:
        if not parts:
            return codec_v1.decode(spec, {key: _empty_v1(spec, key) for key in codec_v1.ARRAY_KEYS})
        return codec_v1.decode(
            spec, {key: np.concatenate([p.arrays[key] for p in parts]) for key in codec_v1.ARRAY_KEYS}
        )
    decoded = [
        codec_v2.decode_example(spec.vocab_size, spec.k, spec.step, p.models, p.arrays["stream"], p.rows) for p in parts
    ]
    k = spec.k
    ids = np.concatenate([d[0] for d in decoded]) if decoded else np.zeros((0, k), np.int64)
    codes = np.concatenate([d[1] for d in decoded]) if decoded else np.zeros((0, k), np.int64)
    tail = np.concatenate([d[2] for d in decoded]) if decoded else np.zeros(0, np.int64)
    label = np.concatenate([p.arrays["label"] for p in parts]) if parts else np.zeros(0, np.float16)
    return codec_v2.values(spec.step, ids, codes, tail, label)


def round_trip(spec: CodecSpec, topk_ids, topk_logprobs, tail_logprob, label_logprob):
    """Encode one example as a one-example shard and decode it: what a store would give back."""
    arrays = encode_shard(spec, [prepare(spec, topk_ids, topk_logprobs, tail_logprob, label_logprob)])
    return decode(spec, [open_shard(spec, _Arrays(arrays)).rows(0)])


def encoded_nbytes(arrays: dict[str, ArrayLike]) -> int:
    """Total bytes of a dict of encoded arrays."""
    return int(sum(as_numpy(a).nbytes for a in arrays.values()))


def kl_error(
    topk_logprobs: ArrayLike, tail_logprob: ArrayLike, decoded_logprobs: ArrayLike, decoded_tail: ArrayLike
) -> torch.Tensor:
    """Per-position KL(P || Q) in nats over the k+1 bins (top-k + tail), float64; P is the original, Q the decoded.

    Both sides are renormalised over their k+1 bins first; bins where P has no mass contribute 0, a bin where P has
    mass and Q has none makes the KL infinite. Entries are compared position by position: pass both in the same
    entry order (v2 decodes in id order: reorder the original with :func:`align`).
    """
    log_p = _log_bins(topk_logprobs, tail_logprob)
    log_q = _log_bins(decoded_logprobs, decoded_tail)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=1)


def align(ids: ArrayLike, values: ArrayLike, decoded_ids: ArrayLike) -> torch.Tensor:
    """``values`` [N, k] (per entry of ``ids``) reordered to the entry order of ``decoded_ids`` (same id sets)."""
    ids_t, values_t, dec_t = (torch.as_tensor(as_numpy(a)) for a in (ids, values, decoded_ids))
    order = ids_t.argsort(dim=1)
    where = torch.searchsorted(ids_t.gather(1, order).contiguous(), dec_t.contiguous())
    return values_t.gather(1, order.gather(1, where))


# --- helpers -------------------------------------------------------------------------------------------------------


class _Arrays:
    """An in-memory stand-in for a ``safetensors`` handle (``get_tensor``, ``get_slice``)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def get_tensor(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def get_slice(self, key: str) -> np.ndarray:
        return self.arrays[key]


def _empty_v1(spec: CodecSpec, key: str) -> np.ndarray:
    arrays = codec_v1.encode(spec, np.zeros((0, spec.k), np.int64), np.zeros((0, spec.k)), np.zeros(0), np.zeros(0))
    return arrays[key]


def _log_bins(topk: ArrayLike, tail: ArrayLike) -> torch.Tensor:
    bins = torch.cat(
        [torch.as_tensor(as_numpy(topk)).double(), torch.as_tensor(as_numpy(tail)).double()[:, None]], dim=1
    )
    lse = torch.logsumexp(bins, dim=1, keepdim=True)
    return bins - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
