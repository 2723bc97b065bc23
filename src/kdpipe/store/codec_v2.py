"""Teacher-store codec v2 (``sorted-ans-v2``): sorted, gap-coded ids and square-root-quantised probabilities,
entropy-coded with rANS (``constriction``) under models fitted per shard.

Per position (row) the k top-k entries are sorted by token id. What is coded, for each example on its own
(one rANS stream per example, so any example decodes without the others):

* **ids** as gaps ``g_j = id_j - id_{j-1} - 1`` (``id_{-1} = -1``). A gap's *symbol* is its bit length ``b``
  and, for ``b >= 2``, the bit after the leading one (``2 * b + that bit``); the remaining ``b - 2`` bits are
  coded uniform. The symbol's model depends on the entry's column group (columns ``[0, k/4)``, ... : sorted
  ids of a real LM are small first and spread out later). Uniformly random ids cost 0.06 bits above
  ``log2 C(V, k) / k``; real ones far less (``kdpipe-bench store``).
* **probabilities** in id order as codes of ``w = sqrt(p) / step`` (uniform in ``w``: for an entropy-coded
  quantiser the square root is the companding that spreads KL(P || Q) evenly over the entries, each costing
  ``step**2 / 6`` nats). Below ``p_s = (2 step / s_log)**2`` the codes continue uniform in ``log p`` with step
  ``s_log = 1`` nat (where the square root's log-step would exceed it) down to ``log p = -30``; entries
  below that take the lowest code. Code 0 is zero mass (``-inf``, underflow in float64). A row's *class*, the
  bit length of its largest code, is coded first and selects the codes' model (peaked rows and flat rows
  have different codes). The tail bin is one more code with a model of its own.
* **label log-probs** stay float16, row-aligned (``label`` [N]).

Decoding renormalises all k+1 bins (top-k and tail) together, like v1, and returns each row's entries in id
order (:func:`kdpipe.store.posthoc.truncate` sorts by probability where the order matters). The models are
each shard's symbol counts (uint32 arrays in the shard), so decoding needs nothing else from the writer.
Arrays of a shard:

==================  ===========================  ===========================================================
key                 shape, dtype                 content
==================  ===========================  ===========================================================
``stream``          [W] uint32                   every example's rANS words, one after the other
``stream_offsets``  [E + 1] int64                example ``e``'s words are ``stream[o[e]:o[e+1]]``
``label``           [N] float16                  ``label_logprob`` per row, as given
``offsets``         [E + 1] int64                example ``e``'s rows are ``[offsets[e], offsets[e+1])``
``m_gap``           [4, 2 * (B + 1)] uint32      gap-symbol counts per column group (B: bit length of V)
``m_class``         [C] uint32                   row-class counts
``m_code``          [C, L] uint32                code counts per row class (L codes)
``m_tail``          [L] uint32                   tail-code counts
==================  ===========================  ===========================================================
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.store.codec_v1 import f16

SCHEME = "sorted-ans-v2"
DEFAULT_STEP = 0.0075  # sqrt(p) step at k <= 64: mean KL ~5e-4 nats/token on SmolLM2's real top-64 (kdpipe-bench store)
LOG_STEP = 1.0  # nats per code below p_s
LOG_FLOOR = -30.0  # the lowest code's log-prob; entries below it take that code
GROUPS = 4  # column groups of the gap models
MODEL_KEYS = ("m_gap", "m_class", "m_code", "m_tail")


def default_step(k: int) -> float:
    """The step for k entries: each entry in the square-root range costs ``step**2 / 6`` nats, so above k = 64
    the step shrinks with ``sqrt(64 / k)`` to keep the KL per token where it is at 64."""
    return DEFAULT_STEP * min(1.0, math.sqrt(64.0 / k))


@dataclass(frozen=True)
class Quantiser:
    """The code <-> log-prob map for one ``step`` (see the module docstring)."""

    step: float

    @property
    def _switch(self) -> tuple[float, float]:
        """(log p_s, w at p_s): where the square-root codes meet the log codes."""
        ws = 2.0 / LOG_STEP  # sqrt(p_s) / step
        return 2.0 * math.log(ws * self.step), ws

    @property
    def _w_floor(self) -> float:
        xs, ws = self._switch
        return ws + (LOG_FLOOR - xs) / LOG_STEP

    @property
    def num_codes(self) -> int:
        """Codes 0 (zero mass) to L, the code of ``p = 1``; the grid in ``w`` is anchored there."""
        return int(np.floor(1.0 / self.step - self._w_floor)) + 2

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """Log-probs (any shape, float) to uint8/uint16 codes."""
        x = np.minimum(np.asarray(logprobs, dtype=np.float64), 0.0)
        xs, ws = self._switch
        top = self.num_codes - 1
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.where(x >= xs, np.exp(x / 2.0) / self.step, ws + (np.maximum(x, LOG_FLOOR) - xs) / LOG_STEP)
        codes = np.clip(np.rint(w - 1.0 / self.step) + top, 1, top).astype(np.int64)
        codes[np.exp(x) == 0.0] = 0  # zero mass in float64 (also -inf)
        return codes.astype(np.uint8 if self.num_codes <= 256 else np.uint16)

    def table(self) -> np.ndarray:
        """Decoded log-prob of each code, float32 [num_codes]; code 0 is ``-inf``, code L is 0 (p = 1)."""
        xs, ws = self._switch
        top = self.num_codes - 1
        w = 1.0 / self.step - (top - np.arange(1, top + 1, dtype=np.float64))
        with np.errstate(divide="ignore"):
            x = np.where(w >= ws, 2.0 * np.log(np.maximum(w, 1e-300) * self.step), xs + (w - ws) * LOG_STEP)
        return np.concatenate([[-np.inf], np.minimum(x, 0.0)]).astype(np.float32)


def _id_dtype(vocab: int):
    return np.uint16 if vocab <= 1 << 16 else np.uint32


def _bit_length(a: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values (0 for 0)."""
    out = np.zeros(a.shape, np.int64)
    nz = a > 0
    out[nz] = np.floor(np.log2(a[nz].astype(np.float64))).astype(np.int64) + 1
    # float64 log2 is exact enough below 2**52, but guard the powers of two anyway
    out[nz & (np.left_shift(1, np.maximum(out - 1, 0)) > a)] -= 1
    return out


def gap_alphabet(vocab: int) -> int:
    return 2 * (int(vocab).bit_length() + 1)


def num_classes(quantiser: Quantiser) -> int:
    return int(quantiser.num_codes - 1).bit_length() + 1


# --- per example: quantise at once (the writer keeps these until the shard is full) ----------------------------


def prepare(vocab: int, k: int, step: float, topk_ids, topk_logprobs, tail_logprob, label_logprob) -> dict:
    """One example's rows sorted by id and quantised: what :func:`encode_shard` entropy-codes."""
    ids, lp = np.asarray(topk_ids, dtype=np.int64), np.asarray(topk_logprobs, dtype=np.float64)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    if ids.size and (np.diff(ids, axis=1) == 0).any():
        raise ValueError("top-k ids must be distinct within a row")
    lp, tail = np.take_along_axis(lp, order, axis=1), np.asarray(tail_logprob, dtype=np.float64)
    # the codes are of probabilities over the k+1 bins: bins that do not sum to 1 are normalised first
    with np.errstate(divide="ignore"):
        lse = np.logaddexp(np.logaddexp.reduce(lp, axis=1, initial=-np.inf), tail)
    lse = np.where(np.isfinite(lse), lse, 0.0)
    quant = Quantiser(step)
    return {
        "ids": ids.astype(_id_dtype(vocab)),
        "codes": quant.encode(lp - lse[:, None]),
        "tail": quant.encode(tail - lse),
        "label": np.asarray(label_logprob, dtype=np.float32),
    }


@dataclass
class _Symbols:
    """The coded symbols of one example, in the order the decoder reads them."""

    classes: np.ndarray  # [n]
    gap_groups: list[np.ndarray]  # per column group, [n, cols] row-major
    mantissa: np.ndarray  # the uniform bits' values, entries with >= 1 bit
    mantissa_sizes: np.ndarray  # 2 ** bits of each
    codes: np.ndarray  # [n, k]
    tail: np.ndarray  # [n]


def _columns(k: int) -> list[slice]:
    edges = [g * k // GROUPS for g in range(GROUPS + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def _symbols(part: dict) -> _Symbols:
    ids = part["ids"].astype(np.int64)
    n = ids.shape[0]
    gaps = np.diff(np.concatenate([np.full((n, 1), -1, np.int64), ids], axis=1), axis=1) - 1
    b = _bit_length(gaps)
    extra = np.maximum(b - 2, 0)  # uniform bits below the leading one and the next
    second = np.where(b >= 2, (gaps >> np.maximum(b - 2, 0)) & 1, 0)
    sym = 2 * b + second
    has = extra > 0
    codes = part["codes"].astype(np.int64)
    classes = _bit_length(codes.max(axis=1, initial=0))
    return _Symbols(
        classes=classes,
        gap_groups=[sym[:, cols] for cols in _columns(ids.shape[1])],
        mantissa=(gaps & ((np.int64(1) << extra) - 1))[has],
        mantissa_sizes=(np.int64(1) << extra)[has],
        codes=codes,
        tail=part["tail"].astype(np.int64),
    )


def encode_shard(vocab: int, k: int, step: float, parts: list[dict]) -> dict[str, np.ndarray]:
    """A shard's arrays from its examples' :func:`prepare` output, in order."""
    import constriction

    quant = Quantiser(step)
    n_codes, n_classes, n_gap = quant.num_codes, num_classes(quant), gap_alphabet(vocab)
    symbols = [_symbols(p) for p in parts]
    m_gap = np.zeros((GROUPS, n_gap), np.uint32)
    m_class = np.zeros(n_classes, np.uint32)
    m_code = np.zeros((n_classes, n_codes), np.uint32)
    m_tail = np.zeros(n_codes, np.uint32)
    for s in symbols:
        for g, group in enumerate(s.gap_groups):
            m_gap[g] += np.bincount(group.ravel(), minlength=n_gap).astype(np.uint32)
        m_class += np.bincount(s.classes, minlength=n_classes).astype(np.uint32)
        np.add.at(m_code, (np.repeat(s.classes, s.codes.shape[1]), s.codes.ravel()), 1)
        m_tail += np.bincount(s.tail, minlength=n_codes).astype(np.uint32)
    models = _Models.from_counts(m_gap, m_class, m_code, m_tail)
    streams = []
    for s in symbols:
        coder = constriction.stream.stack.AnsCoder()
        # a stack: encode in the reverse of the decoding order
        coder.encode_reverse(s.tail.astype(np.int32), models.tail)
        for c in sorted(np.unique(s.classes).tolist(), reverse=True):
            coder.encode_reverse(s.codes[s.classes == c].ravel().astype(np.int32), models.code[c])
        if s.mantissa.size:
            coder.encode_reverse(s.mantissa.astype(np.int32), models.uniform, s.mantissa_sizes.astype(np.int32))
        for g in reversed(range(GROUPS)):
            if s.gap_groups[g].size:
                coder.encode_reverse(s.gap_groups[g].ravel().astype(np.int32), models.gap[g])
        coder.encode_reverse(s.classes.astype(np.int32), models.classes)
        streams.append(np.asarray(coder.get_compressed(), dtype=np.uint32))
    lengths = [len(p["label"]) for p in parts]
    return {
        "stream": np.concatenate(streams) if streams else np.zeros(0, np.uint32),
        "stream_offsets": np.concatenate([[0], np.cumsum([len(s) for s in streams])]).astype(np.int64),
        "label": f16(np.concatenate([p["label"] for p in parts]) if parts else np.zeros(0, np.float32)),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "m_gap": m_gap,
        "m_class": m_class,
        "m_code": m_code,
        "m_tail": m_tail,
    }


class _Models:
    """The entropy models of one shard (``constriction`` categoricals built once from the counts)."""

    def __init__(self, gap, classes, code, tail, uniform) -> None:
        self.gap, self.classes, self.code, self.tail, self.uniform = gap, classes, code, tail, uniform

    @classmethod
    def from_counts(cls, m_gap, m_class, m_code, m_tail) -> _Models:
        import constriction

        model = constriction.stream.model

        def cat(counts: np.ndarray):
            counts = np.asarray(counts, dtype=np.float64)
            # every symbol keeps a nonzero probability (constriction guarantees it), so a count of 0 is fine
            return model.Categorical(counts if counts.sum() > 0 else np.ones_like(counts), perfect=False)

        return cls(
            [cat(row) for row in m_gap],
            cat(m_class),
            [cat(row) for row in m_code],
            cat(m_tail),
            model.Uniform(),
        )


def load_models(arrays: dict[str, np.ndarray]) -> _Models:
    """A shard's models from its ``m_*`` arrays."""
    return _Models.from_counts(*(np.asarray(arrays[key]) for key in MODEL_KEYS))


def decode_example(
    vocab: int, k: int, step: float, models: _Models, words: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example's ``n`` rows: ids int64 [n, k] (sorted by id), codes [n, k], tail codes [n]."""
    import constriction

    if n == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.int64), np.zeros(0, np.int64)
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    classes = np.asarray(coder.decode(models.classes, n), dtype=np.int64)
    sym = np.empty((n, k), np.int64)
    for g, cols in enumerate(_columns(k)):
        width = cols.stop - cols.start
        if width:
            sym[:, cols] = np.asarray(coder.decode(models.gap[g], n * width), dtype=np.int64).reshape(n, width)
    b, second = sym // 2, sym % 2
    extra = np.maximum(b - 2, 0)
    has = extra > 0
    gaps = np.where(b >= 2, (2 + second) << extra, b)  # the leading one and the next bit, shifted
    gaps = np.where(b == 1, 1, np.where(b == 0, 0, gaps))
    if has.any():
        sizes = (np.int64(1) << extra)[has].astype(np.int32)
        gaps[has] += np.asarray(coder.decode(models.uniform, sizes), dtype=np.int64)
    ids = np.cumsum(gaps + 1, axis=1) - 1
    codes = np.empty((n, k), np.int64)
    for c in sorted(np.unique(classes).tolist()):
        rows = classes == c
        codes[rows] = np.asarray(coder.decode(models.code[c], int(rows.sum()) * k), dtype=np.int64).reshape(-1, k)
    tail = np.asarray(coder.decode(models.tail, n), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError("decoded ids fall outside the vocabulary: the stream is damaged")
    return ids, codes, tail


def values(step: float, ids: np.ndarray, codes: np.ndarray, tail_codes: np.ndarray, label: np.ndarray):
    """Decoded rows as torch tensors: ids int64 [N, k] and log-probs [N, k] (in id order), tail [N], label [N];
    top-k and tail renormalised together (by table look-ups: no exp or log per entry)."""
    table, probs = _tables(step)
    total = probs[codes].sum(axis=1) + probs[tail_codes]
    with np.errstate(divide="ignore"):
        shift = np.where(total > 0, np.log(total), 0.0).astype(np.float32)  # a row with no mass stays as is
    lp = table[codes] - shift[:, None]
    tail = table[tail_codes] - shift
    return (
        torch.from_numpy(ids),
        torch.from_numpy(lp),
        torch.from_numpy(tail),
        torch.from_numpy(np.asarray(label, dtype=np.float32)),
    )


_TABLES: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def _tables(step: float) -> tuple[np.ndarray, np.ndarray]:
    """Each code's log-prob (float32) and probability (float64), built once per step."""
    if step not in _TABLES:
        table = Quantiser(step).table()
        _TABLES[step] = (table, np.exp(table.astype(np.float64)))
    return _TABLES[step]
