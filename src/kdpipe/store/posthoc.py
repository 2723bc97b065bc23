"""Reading a teacher store at a smaller k, or at another temperature, than it was scored with: no new capture.

* **k' < k** (:func:`truncate`): each row's k' most probable entries; the other k - k' fold into the tail bin.
  Exact: the same distribution over fewer bins, so a k-store read at k' equals a store captured at k' up to the
  codec's quantisation (and the order of entries tied within it).
* **temperature T' != T** (:func:`retemper`): the stored log-probs are ``z / T - log Z(T)``, so at T' every top-k
  entry is ``a * lp`` up to the normaliser, ``a = T / T'``, exactly. The tail bin at T' needs
  ``S = sum_j p_j ** a`` over the V - k tail tokens, which the store does not hold; what it does hold bounds it:
  every tail token has ``p_j <= p_min`` (the smallest top-k probability) and they sum to the tail mass ``m``,
  so S lies between ``m * p_min ** (a - 1)`` (all mass at ``p_min``) and ``m ** a * (V - k) ** (1 - a)`` (spread
  evenly) (:func:`tail_bounds`). The estimate extends the row's own decay: a power law ``p_r ~ r ** -alpha``
  fitted to the lower half of the top-k ranks, scaled to the tail mass, clipped to the bounds. The label
  log-prob is re-tempered the same way. :func:`tail_error_bound` gives, per position, the largest KL the tail
  estimate can cost; ``kdpipe-bench store`` reports the measured error over T' in [0.5, 2].
"""

from __future__ import annotations

import math

import torch

from kdpipe.store.reader import StoreUnion, TeacherRows


def truncate(rows: TeacherRows, k: int) -> TeacherRows:
    """The ``k`` most probable entries of each row (ties by position); the rest folded into the tail bin."""
    if k >= rows.topk_ids.shape[1]:
        return rows
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lp, order = rows.topk_logprobs.sort(dim=1, descending=True, stable=True)
    ids = rows.topk_ids.gather(1, order)
    folded = torch.logsumexp(torch.cat([lp[:, k:], rows.tail_logprob[:, None]], dim=1), dim=1)
    return TeacherRows(ids[:, :k].contiguous(), lp[:, :k].contiguous(), folded, rows.label_logprob)


def tail_bounds(
    topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, a: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``log sum_j p_j ** a`` over the tail tokens (float64 [N] each; -inf when the tail is empty)."""
    lp, tail = topk_logprobs.double(), tail_logprob.double()
    n_tail = vocab_size - lp.shape[1]
    finite = torch.isfinite(lp)
    log_pmin = torch.where(finite, lp, torch.inf).amin(dim=1).clamp(max=0.0)
    log_pmin = torch.where(torch.isfinite(log_pmin), log_pmin, tail)  # no top-k mass: the tail bounds itself
    concentrated = tail + (a - 1.0) * log_pmin
    uniform = a * tail + (1.0 - a) * math.log(max(n_tail, 1))
    lo, hi = torch.minimum(concentrated, uniform), torch.maximum(concentrated, uniform)
    empty = torch.isneginf(tail) | (n_tail <= 0)
    return torch.where(empty, -torch.inf, lo), torch.where(empty, -torch.inf, hi)


def _log_power_sum(beta: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """``log sum_{r=first}^{last} r ** -beta`` by the midpoint integral (float64)."""
    lo, hi = math.log(first - 0.5), math.log(last + 0.5)
    one = (1.0 - beta).abs() < 1e-6
    c = torch.where(one, torch.ones_like(beta), 1.0 - beta)  # integral x^-beta = (x^c) / c
    # log((hi^c - lo^c) / c), computed stably for either sign of c
    big, small = torch.maximum(c * hi, c * lo), torch.minimum(c * hi, c * lo)
    val = big + torch.log1p(-torch.exp(small - big)) - torch.log(c.abs())
    return torch.where(one, torch.full_like(beta, math.log(hi - lo)), val)


def tail_estimate(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, a: float, vocab_size: int) -> torch.Tensor:
    """The estimate of ``log sum_j p_j ** a`` over the tail (float64 [N]), inside :func:`tail_bounds`."""
    lp = topk_logprobs.double().sort(dim=1, descending=True).values
    k = lp.shape[1]
    lo, hi = tail_bounds(topk_logprobs, tail_logprob, a, vocab_size)
    if vocab_size <= k:
        return lo
    half = max(k // 2, 1)
    x = torch.log(torch.arange(half, k + 1, dtype=torch.float64))[None, :].expand(lp.shape[0], -1)
    y = lp[:, half - 1 :]
    ok = torch.isfinite(y)
    n = ok.sum(1).clamp(min=1)
    xm = torch.where(ok, x, 0.0).sum(1) / n
    ym = torch.where(ok, y, 0.0).sum(1) / n
    cov = torch.where(ok, (x - xm[:, None]) * (y - ym[:, None]), 0.0).sum(1)
    var = torch.where(ok, (x - xm[:, None]) ** 2, 0.0).sum(1)
    alpha = torch.where(var > 0, -cov / var.clamp(min=1e-12), torch.zeros_like(cov)).clamp(min=0.0, max=50.0)
    tail = tail_logprob.double()
    log_c = tail - _log_power_sum(alpha, k + 1, vocab_size)
    est = a * log_c + _log_power_sum(a * alpha, k + 1, vocab_size)
    est = torch.where(torch.isfinite(est), est, lo)
    return torch.minimum(torch.maximum(est, lo), hi)


def retemper(rows: TeacherRows, from_temperature: float, to_temperature: float, vocab_size: int) -> TeacherRows:
    """The rows at ``to_temperature`` from rows stored at ``from_temperature`` (top-k exact, tail estimated)."""
    if from_temperature == to_temperature:
        return rows
    if from_temperature <= 0 or to_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {from_temperature} -> {to_temperature}")
    a = from_temperature / to_temperature
    lp = rows.topk_logprobs.double()
    log_s = tail_estimate(lp, rows.tail_logprob, a, vocab_size)
    scaled = a * lp
    lse = torch.logsumexp(torch.cat([scaled, log_s[:, None]], dim=1), dim=1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return TeacherRows(
        rows.topk_ids,
        (scaled - lse[:, None]).float(),
        (log_s - lse).float(),
        (a * rows.label_logprob.double() - lse).float(),
    )


def tail_error_bound(
    topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, a: float, vocab_size: int
) -> torch.Tensor:
    """Per position, the largest KL(exact || re-tempered) over the k+1 bins that the tail estimate can cost:
    the true tail weight lies in :func:`tail_bounds`, the estimate too, so they differ by a factor ``e**d`` with
    ``|d| <= hi - lo``; with ``pi`` the true tail bin's probability the KL is ``log(1 - pi + pi e**d) - pi d``,
    maximised over ``d = +-(hi - lo)`` and ``pi`` over the range the bounds allow."""
    lo, hi = tail_bounds(topk_logprobs, tail_logprob, a, vocab_size)
    lse_k = torch.logsumexp(a * topk_logprobs.double(), dim=1)
    width = (hi - lo).nan_to_num(0.0)
    pis = [torch.sigmoid(lo - lse_k + t * (hi - lo).nan_to_num(0.0)) for t in torch.linspace(0, 1, 17).tolist()]
    worst = torch.zeros_like(lse_k)
    for pi in pis:
        pi = pi.nan_to_num(0.0)
        for d in (width, -width):
            kl = torch.log1p(pi * torch.expm1(d)) - pi * d
            worst = torch.maximum(worst, kl.nan_to_num(0.0))
    return torch.where(torch.isneginf(lo), torch.zeros_like(worst), worst)


class PostHocStore:
    """A store (or union) read at ``k`` entries and/or ``temperature``; the rest of its interface passes through."""

    def __init__(self, store, k: int | None = None, temperature: float | None = None) -> None:
        self.store, self.vocab_size = store, int(store.vocab_size)
        self.stored_k = int(store.k)
        if k is not None and not 1 <= int(k) <= self.stored_k:
            raise ValueError(f"teacher_k={k} must be in [1, {self.stored_k}] (the store's k)")
        self.k = int(k) if k is not None else self.stored_k
        self.stored_temperature = float(store.temperature)
        self.temperature = float(temperature) if temperature is not None else self.stored_temperature

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.store

    def transform(self, rows: TeacherRows) -> TeacherRows:
        rows = retemper(rows, self.stored_temperature, self.temperature, self.vocab_size)
        return truncate(rows, self.k)

    def get(self, example_id: str) -> TeacherRows:
        return self.transform(self.store.get(example_id))

    def get_many(self, example_ids: list[str]) -> tuple[TeacherRows, list[int]]:
        rows, counts = self.store.get_many(example_ids)
        return self.transform(rows), counts


def join(stores: list) -> object:
    """One readable view of several stores (label-conditioned and on-policy): a :class:`StoreUnion` of the
    stores, read through one :class:`PostHocStore` when they are post-hoc views with the same settings."""
    if len(stores) == 1:
        return stores[0]
    views = [s for s in stores if isinstance(s, PostHocStore)]
    if not views:
        return StoreUnion(stores)
    if len(views) != len(stores) or len({(v.k, v.temperature) for v in views}) != 1:
        raise ValueError("stores read in one batch need the same teacher_k and teacher_temperature")
    return PostHocStore(StoreUnion([v.store for v in views]), k=views[0].k, temperature=views[0].temperature)
