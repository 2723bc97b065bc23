"""``kdpipe-score``: write teacher stores for a teacher export (or a pretrained teacher) and a dataset,
outside a pipeline (``kdpipe-cache`` is the same command under its old name, for one release).

    kdpipe-score teacher_path=logs/runs/<run>/01_teacher_sft/export 'styles=[fast]' k=32
    kdpipe-score engine=vllm 'styles=[reasoning]'    # the shipped teacher on vLLM (from .venv-vllm on a CPU)

The keys of a ``score`` stage (``configs/stage/score.yaml``) are top-level here. Each store lands under
``store_root`` (default ``logs/stores/``) with a content-derived name, so a pipeline's ``score`` stage over
the same teacher, data, k and temperature finds and reuses it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from kdpipe.accelerators import register as register_accelerators
from kdpipe.cli.errors import exit_on_user_error, run_hydra_command
from kdpipe.cli.overrides import check_overrides
from kdpipe.data.datamodule import encode_examples
from kdpipe.data.sources import load_examples
from kdpipe.engines import score_with
from kdpipe.engines.vllm_engine import ENGINES, INSTALL, VllmEngine, VllmSettings, vllm_available
from kdpipe.errors import PipelineConfigError
from kdpipe.lightning.trainer import check_trainer_device
from kdpipe.models.factory import (
    build_model,
    build_tokenizer,
    load_model,
    load_options,
    load_tokenizer,
    pretrained_dir,
)
from kdpipe.store.reader import TeacherStore
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party


def load_teacher(cfg: DictConfig):
    """The teacher: the export at ``teacher_path``, else the pretrained ``models.teacher``."""
    options = load_options(cfg.models.teacher)
    if cfg.get("teacher_path"):
        path = Path(str(cfg.teacher_path)).expanduser().resolve()
        if not path.is_dir():
            raise PipelineConfigError(f"teacher_path {path} is not a directory (expected an HF export)")
        return load_model(path, **options), load_tokenizer(path, options["trust_remote_code"])
    if cfg.models.teacher.source != "pretrained":
        raise PipelineConfigError("give teacher_path=<export dir>, or a pretrained teacher (model.source=pretrained)")
    converted = Path(str(cfg.paths.log_dir)).expanduser().resolve() / "converted"
    tokenizer = build_tokenizer(cfg.models.teacher, converted)
    return build_model(cfg.models.teacher, tokenizer, converted), tokenizer


def teacher_checkpoint(cfg: DictConfig) -> tuple[Path, object]:
    """For ``engine=vllm``: the teacher's checkpoint folder (``teacher_path``, else the pretrained
    ``models.teacher``'s, a hub id's snapshot or the converted GGUF) and its tokenizer, no weights loaded."""
    options = load_options(cfg.models.teacher)
    if cfg.get("teacher_path"):
        path = Path(str(cfg.teacher_path)).expanduser().resolve()
        if not path.is_dir():
            raise PipelineConfigError(f"teacher_path {path} is not a directory (expected an HF export)")
        return path, load_tokenizer(path, options["trust_remote_code"])
    if cfg.models.teacher.source != "pretrained":
        raise PipelineConfigError("give teacher_path=<export dir>, or a pretrained teacher (model.source=pretrained)")
    converted = Path(str(cfg.paths.log_dir)).expanduser().resolve() / "converted"
    path = Path(pretrained_dir(cfg.models.teacher, converted))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(path)))
    return path, build_tokenizer(cfg.models.teacher, converted)


def score(cfg: DictConfig) -> dict[str, Path]:
    """Score the teacher over ``split`` of ``data`` in each of ``styles``; returns style -> store path."""
    check_trainer_device(cfg.trainer)  # e.g. trainer=npu without torch_npu or CANN: fail before loading anything
    if str(cfg.sequences) != "labels":
        raise PipelineConfigError("kdpipe-score scores label sequences (sequences=labels); rollouts need a pipeline")
    engine = str(cfg.get("engine") or "hf")
    if engine not in ENGINES:
        raise PipelineConfigError(f"engine={engine}: choose one of {list(ENGINES)}")
    if engine == "vllm":
        if not vllm_available():
            raise PipelineConfigError(f"engine=vllm, but vLLM is not installed: {INSTALL}")
        model_dir, tokenizer = teacher_checkpoint(cfg)
        model = VllmEngine(model_dir, VllmSettings.from_config(cfg.get("vllm")), int(cfg.k))
    else:
        model, tokenizer = load_teacher(cfg)
    raw = load_examples(cfg.data, str(cfg.split))
    stores = {}
    for style in map(str, cfg.styles):
        examples, _ = encode_examples(tokenizer, cfg.data, raw, [style])
        common = {
            "style": style,
            "split": str(cfg.split),
            "store_root": str(cfg.store_root),
            "k": int(cfg.k),
            "temperature": float(cfg.temperature),
            "batch_size": int(cfg.batch_size),
            "shard_size": int(cfg.shard_size),
        }
        path = score_with(
            model,
            tokenizer,
            examples,
            chunk_size=int(cfg.chunk_size),
            precision=cfg.get("precision"),
            trainer=cfg.trainer,
            **common,
        )
        store = TeacherStore(path)
        nbytes, rows = store.nbytes, store.num_rows
        Console().print(
            f"{style}: {path} ({len(examples)} examples, {rows} label tokens, "
            f"{nbytes / max(rows * int(cfg.k), 1):.3f} bytes/entry)"
        )
        stores[style] = path
    return stores


def _main(cfg: DictConfig, prog: str) -> None:
    quiet_third_party()
    register_accelerators()
    with exit_on_user_error(prog):
        score(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="score")
def hydra_main(cfg: DictConfig) -> None:
    _main(cfg, "kdpipe-score")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="score")
def hydra_cache_alias(cfg: DictConfig) -> None:
    _main(cfg, "kdpipe-cache")


def main() -> None:
    """``kdpipe-score``: the command line's keys checked, then Hydra's entry point; user errors in one line."""
    run_hydra_command("kdpipe-score", hydra_main, check=lambda: check_overrides(sys.argv[1:], "score"))


def cache_alias() -> None:
    """``kdpipe-cache``: the old name of ``kdpipe-score`` (removed in the next release)."""
    print("kdpipe-cache is now kdpipe-score (the old name goes in the next release)", file=sys.stderr)
    run_hydra_command("kdpipe-cache", hydra_cache_alias, check=lambda: check_overrides(sys.argv[1:], "score"))


if __name__ == "__main__":
    main()
