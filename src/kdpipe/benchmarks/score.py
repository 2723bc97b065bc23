"""``kdpipe-bench score``: teacher scoring throughput of each engine on the same sequences.

Each model scores the same examples (the built-in task's train split, reasoning responses, rendered with the
model's own chat template) into a fresh store with ``engine: hf`` (Lightning ``Trainer.predict``, fp32) and
``engine: vllm`` (prompt log-probs, fp32 unless ``--vllm-dtype``); a warm-up on the first batch comes first and is
not timed. Reported: engine start (model load) and scoring seconds, sequence tokens and label tokens per second
of scoring, and how the two engines' rows agree before the store's codec (top-1 ids, top-k overlap, max
|log-prob difference| on shared ids, label log-probs) on the first 64 examples. An engine
that cannot run here is a row that says why.
"""

from __future__ import annotations

import tempfile
import time

import torch

from kdpipe.benchmarks.step_real import chat_arith_records, encode_records, load_real_model

MODELS = ("arith-teacher", "smollm2-135m")
AGREEMENT_EXAMPLES = 64  # the engines' rows compared on this many examples (one HF forward each)
ENGINES = ("hf", "vllm")


def _model(name: str):
    """(tokenizer, HF model, checkpoint folder) of a benchmark model."""
    from kdpipe.models.factory import load_model, load_tokenizer, resolve_path

    if name == "arith-teacher":
        directory = resolve_path("pkg://kdpipe/assets/arith_teacher")
        return load_tokenizer(directory), load_model(directory, dtype=torch.float32), directory
    tokenizer, model, directory = load_real_model(name)
    return tokenizer, model.eval(), directory


def _examples(tokenizer, n: int):
    return encode_records(tokenizer, chat_arith_records(n), max_length=256)


def _agreement(model, engine, examples, k: int) -> dict:
    """The two engines' rows of the first examples, before the store's codec."""
    from kdpipe.engines.scoring import row_agreement, score_rows
    from kdpipe.engines.vllm_engine import score_rows as vllm_rows

    return row_agreement(score_rows(model, examples, k), vllm_rows(engine.llm, examples, k))


def run(models=MODELS, engines=ENGINES, examples: int = 512, k: int = 16, batch_size: int = 64,
        vllm_dtype: str = "float32") -> dict:  # fmt: skip
    """Every engine's row per model; the Hugging Face rows first (vLLM's CPU worker pins this process's threads
    when it starts, which would slow any torch run after it)."""
    from kdpipe.engines import score_teacher, score_teacher_vllm
    from kdpipe.engines.vllm_engine import VllmEngine, VllmSettings, model_problem, vllm_available, vllm_version

    rows, stores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = {name: _model(name) for name in models}
        data = {name: _examples(loaded[name][0], examples) for name in models}
        for engine in [e for e in ENGINES if e in engines]:
            for name in models:
                tokenizer, model, directory = loaded[name]
                tokens = sum(len(e.input_ids) for e in data[name])
                labels = sum(e.num_label_tokens for e in data[name])
                row = {"model": name, "engine": engine, "examples": len(data[name]), "tokens": tokens, "k": k}
                why = None
                if engine == "vllm":
                    why = "vLLM is not installed (make venv-vllm)" if not vllm_available() else model_problem(directory)
                if why:
                    rows.append({**row, "note": why})
                    continue
                common = {"style": "reasoning", "split": "bench", "k": k, "batch_size": batch_size}
                warm, timed = data[name][:batch_size], data[name]
                started = time.perf_counter()
                if engine == "vllm":
                    settings = VllmSettings(dtype=vllm_dtype, enforce_eager=True, max_model_len=256)
                    scorer = VllmEngine(directory, settings, k)
                    scorer.llm  # noqa: B018 (built here, so that its start is timed apart)
                    row.update(load_s=time.perf_counter() - started, dtype=vllm_dtype, version=vllm_version())
                    score_teacher_vllm(scorer, tokenizer, warm, store_root=f"{tmp}/warm-{name}-{engine}", **common)
                    started = time.perf_counter()
                    path = score_teacher_vllm(scorer, tokenizer, timed, store_root=f"{tmp}/{name}-{engine}", **common)
                else:
                    row.update(load_s=None, dtype="float32")  # loaded once above, for both engines
                    score_teacher(model, tokenizer, warm, store_root=f"{tmp}/warm-{name}-{engine}", **common)
                    started = time.perf_counter()
                    path = score_teacher(model, tokenizer, timed, store_root=f"{tmp}/{name}-{engine}", **common)
                seconds = time.perf_counter() - started
                stores[name, engine] = path
                row.update(score_s=seconds, tokens_per_s=tokens / seconds, label_tokens_per_s=labels / seconds)
                if engine == "vllm":
                    row.update(_agreement(model, scorer, data[name][:AGREEMENT_EXAMPLES], k))
                    hf_row = next((r for r in rows if r["model"] == name and r["engine"] == "hf"), None)
                    if hf_row is not None and "score_s" in hf_row:
                        row["speedup_over_hf"] = hf_row["score_s"] / seconds
                rows.append(row)
    return {"score": rows, "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
