"""LM-head loss benchmark: plain vs fused vs the bare LM-head matmul (the floor), forward + backward, for
every divergence (``--divergences``) and tail mode (``--tails``: the tail mode changes the work).

Each case runs in its own process, so peak memory is honest: on CPU the growth of the process's resident-set
high-water mark (``ru_maxrss``) over what the inputs already took; on CUDA ``torch.cuda.max_memory_allocated``
over the inputs. Time is the median of ``repeats`` runs after ``warmup`` runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {  # name: (N label positions, H hidden, V vocab, k)
    "smollm2-135m": (8192, 576, 49152, 64),
    "openpangu-1b": (4096, 1536, 153376, 64),
    "tiny": (256, 32, 1000, 16),  # for tests
}
CASES = ("floor", "plain", "fused")


def parse_shape(shape: str) -> tuple[int, int, int, int]:
    """A shape name, optionally with the token count overridden: ``smollm2-135m@2048``."""
    name, _, tokens = shape.partition("@")
    n, h, v, k = SHAPES[name]
    return (int(tokens) if tokens else n), h, v, k


def make_inputs(n: int, h: int, v: int, k: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device).requires_grad_(True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))]).repeat(-(-n // 64), 1)[:n]
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g) * 2, dim=-1) - 0.1  # top-k holds ~90% of the mass
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1 - 1e-6))
    labels = ids[:, 0].clone()
    return hidden, weight, ids.to(device), logprobs.to(device), tail.to(device), labels.to(device)


def run_case(
    case: str,
    shape: str,
    device: str,
    repeats: int,
    warmup: int,
    chunk_size: int | None,
    divergence: str = "fkl",
    tail_mode: str = "bucket",
) -> dict:
    """Time and peak memory of one case (call in a fresh process)."""
    from kdpipe.losses import KDLossSettings, fused_sparse_kd_loss, sparse_kd_loss
    from kdpipe.losses.chunked import auto_chunk_size

    n, h, v, k = parse_shape(shape)
    hidden, weight, ids, logprobs, tail, labels = make_inputs(n, h, v, k, device)
    settings = KDLossSettings(divergence=divergence, tail=tail_mode, ce_weight=0.5, beta=0.5)

    def step():
        if case == "floor":
            logits = hidden @ weight.t()
            logits.backward(torch.ones_like(logits))
        elif case == "chunked_floor":  # the fused loss's own loop and buffers, the three matmuls and nothing else
            chunk = chunk_size or auto_chunk_size(v)
            with torch.no_grad():
                buf = torch.empty(min(chunk, n), v, device=hidden.device)
                grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    logits = buf[: stop - start]
                    torch.mm(hidden[start:stop], weight.t(), out=logits)
                    grad_h[start:stop] = logits @ weight
                    grad_w.addmm_(logits.t(), hidden[start:stop])
        elif case == "plain":
            sparse_kd_loss(hidden @ weight.t(), ids, logprobs, tail, labels, settings).backward()
        else:
            loss = fused_sparse_kd_loss(hidden, weight, ids, logprobs, tail, labels, settings, chunk_size=chunk_size)
            loss.backward()
        hidden.grad = weight.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "case": case,
        "shape": shape,
        "divergence": divergence if "floor" not in case else None,
        "tail": tail_mode if "floor" not in case else None,
        "seconds": statistics.median(times),
        "peak_bytes": max(peak, 0),
    }


def _measure(case, shape, device, repeats, warmup, chunk_size, divergence="fkl", tail_mode="bucket") -> dict:
    args = [case, shape, device, repeats, warmup, chunk_size or 0, divergence, tail_mode]
    cmd = [sys.executable, "-m", "kdpipe.benchmarks.loss", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def run(
    shapes: list[str],
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    chunk_size: int | None = None,
    divergences: list[str] | None = None,
    tails: list[str] | None = None,
    floor_chunked: bool = True,
):
    """The floor once per shape, then plain and fused for each divergence and tail mode, each in its own
    process; returns the rows and one summary row per (shape, divergence, tail) with the ratios."""
    divergences, tails = divergences or ["fkl"], tails or ["bucket"]
    rows, summary = [], []
    for shape in shapes:
        floor = _measure("floor", shape, device, repeats, warmup, chunk_size)
        chunked = _measure("chunked_floor", shape, device, repeats, warmup, chunk_size) if floor_chunked else None
        rows += [floor] + ([chunked] if chunked else [])
        n, h, v, k = parse_shape(shape)
        for divergence in divergences:
            for tail_mode in tails:
                plain, fused = (
                    _measure(case, shape, device, repeats, warmup, chunk_size, divergence, tail_mode)
                    for case in ("plain", "fused")
                )
                rows += [plain, fused]
                summary.append(
                    {
                        "shape": shape,
                        "divergence": divergence,
                        "tail": tail_mode,
                        "N": n,
                        "H": h,
                        "V": v,
                        "k": k,
                        "device": device,
                        "floor_s": floor["seconds"],
                        "plain_s": plain["seconds"],
                        "fused_s": fused["seconds"],
                        "floor_peak_gib": floor["peak_bytes"] / 2**30,
                        "plain_peak_gib": plain["peak_bytes"] / 2**30,
                        "fused_peak_gib": fused["peak_bytes"] / 2**30,
                        "peak_mem_ratio_vs_plain": fused["peak_bytes"] / max(plain["peak_bytes"], 1),
                        "time_ratio_vs_plain": fused["seconds"] / plain["seconds"],
                        "time_ratio_vs_floor": fused["seconds"] / floor["seconds"],
                        # the stricter floor: the same chunk loop and buffers, matmuls only
                        "chunked_floor_s": chunked["seconds"] if chunked else None,
                        "time_ratio_vs_chunked_floor": fused["seconds"] / chunked["seconds"] if chunked else None,
                    }
                )
    return rows, summary


if __name__ == "__main__":
    case, shape, device, repeats, warmup, chunk, divergence, tail_mode = sys.argv[1:9]
    torch.manual_seed(0)
    result = run_case(case, shape, device, int(repeats), int(warmup), int(chunk) or None, divergence, tail_mode)
    print(json.dumps(result))
