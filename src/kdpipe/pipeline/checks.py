"""Checks a pipeline passes before any stage runs (beyond the stage specs themselves): teacher and student
share one vocabulary, and the trainer's device can be used here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kdpipe.data.scorers import needs_store
from kdpipe.errors import PipelineConfigError
from kdpipe.models.factory import build_tokenizer
from kdpipe.models.vocab import vocabulary_differences
from kdpipe.pipeline.spec import StageSpec


def teacher_student_pairs(specs: Sequence[StageSpec]) -> list[tuple[str, str]]:
    """(scoring model, distilled model) pairs: every ``score`` stage's model against every model trained on a
    store (``kd`` stages, and stages whose curriculum reads the teacher store), where the two differ."""
    teachers = sorted({s.model for s in specs if s.kind == "score"})
    reads_store = [s for s in specs if s.kind == "kd" or needs_store(s.config.get("curriculum") or {})]
    students = sorted({s.model for s in reads_store})
    return [(t, s) for t in teachers for s in students if t != s]


def check_shared_vocabulary(cfg: DictConfig, specs: Sequence[StageSpec]) -> None:
    """Raise :class:`PipelineConfigError` when a teacher and a student of the pipeline tokenize differently."""
    pairs = teacher_student_pairs(specs)
    if not pairs:
        return
    cache_root = Path(str(cfg.paths.log_dir)).expanduser() / "converted"
    loaded: dict[str, PreTrainedTokenizerBase] = {}

    def tokenizer_of(name: str) -> PreTrainedTokenizerBase:
        model_cfg = cfg.models[name]
        key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True, default=str)
        if key not in loaded:
            loaded[key] = build_tokenizer(model_cfg, cache_root)
        return loaded[key]

    for teacher, student in pairs:
        problems = vocabulary_differences(tokenizer_of(teacher), tokenizer_of(student), (teacher, student))
        if problems:
            raise PipelineConfigError(
                f"models.{teacher} scores a teacher signal that models.{student} is distilled on, but their "
                f"tokenizers differ: {'; '.join(problems)}. Teacher and student must share one vocabulary "
                f"(same tokens and ids), chat template and special tokens."
            )
