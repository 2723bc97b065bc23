"""The preflight's engine checks: a ``score`` or ``rollout`` stage with ``engine: vllm`` can run here (vLLM is
installed, the model is one its attention runs on this device, the stage asks only what vLLM returns), before
any stage trains."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from kdpipe.engines.vllm_engine import CPU_HEAD_SIZES, ENGINES, INSTALL, head_size, on_cpu, vllm_available
from kdpipe.models.factory import resolve_path
from kdpipe.pipeline.spec import StageSpec


def _model_config(cfg: DictConfig, model: str) -> dict | None:
    """The HF config (``config.json``, else the ``arch`` a config-built model gets) of ``models.<model>``, when
    it can be known before the run: a local or package checkpoint, or an architecture."""
    model_cfg = cfg.models[model]
    if model_cfg.get("source") == "config":
        arch = model_cfg.get("arch")
        return dict(arch) if arch is not None else None
    if model_cfg.get("gguf_file") or not model_cfg.get("path"):
        return None  # converted on first use; vLLM's check runs then
    try:
        config_file = Path(resolve_path(model_cfg.path)) / "config.json"
    except FileNotFoundError:
        return None  # the model checks name it
    return json.loads(config_file.read_text()) if config_file.exists() else None


def check_engines(cfg: DictConfig, specs: Sequence[StageSpec]) -> list[str]:
    problems, missing_named = [], False
    for spec in specs:
        if spec.kind not in ("score", "rollout"):
            continue
        engine = str(spec.config.get("engine") or "hf")
        where = f"pipeline.stages.{spec.name}.engine={engine}"
        if engine not in ENGINES:
            problems.append(f"{where}: choose one of {list(ENGINES)}")
            continue
        if engine != "vllm":
            continue
        if not vllm_available() and not missing_named:
            problems.append(f"{where}, but vLLM is not installed: {INSTALL}")
            missing_named = True
        if spec.kind == "score" and float(spec.config.get("temperature", 1.0)) != 1.0:
            problems.append(
                f"{where} scores at temperature 1 only (vLLM applies no temperature to prompt log-probs), not "
                f"pipeline.stages.{spec.name}.temperature={spec.config.temperature}: score at 1 and read the "
                "store at another teacher_temperature"
            )
        config = _model_config(cfg, spec.model)
        if config and on_cpu() and "hidden_size" in config and "num_attention_heads" in config:
            size = head_size(config)
            if size not in CPU_HEAD_SIZES:
                problems.append(
                    f"{where}: model {spec.model!r} has attention head size {size}, which vLLM's CPU attention "
                    f"does not implement ({', '.join(map(str, CPU_HEAD_SIZES))}): use engine: hf on this CPU"
                )
    return problems
