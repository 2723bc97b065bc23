"""Ship the built-in task's teacher: copy a run's teacher export into the package, with its recipe.

    kdpipe-train experiment=arith_teacher hydra.run.dir=logs/teacher   # ~26 min on 2 CPU cores
    python -m kdpipe.cli.teacher logs/teacher                          # -> src/kdpipe/assets/arith_teacher

``make teacher`` runs both. The default pipeline loads the shipped teacher (``model/arith_teacher``:
``pkg://kdpipe/assets/arith_teacher``) instead of training one, so ``make demo`` starts from a teacher that
knows both response modes. ``recipe.json`` beside the weights records what made them: the teacher stage's
resolved settings, the teacher's model and data configs and the run seed (:func:`recipe_of`), its
evaluations in both modes, the weights' sha256 and the versions that trained it. The tests check that the
shipped recipe is what ``experiment=arith_teacher`` composes today (so the command reproduces the file's
recipe) and, marked slow, retrain it and compare the accuracies.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from kdpipe.pipeline.spec import resolve_stages, stage_data
from kdpipe.pipeline.stages import STAGE_KINDS
from kdpipe.utils.io import atomic_dir, atomic_write_json, read_json, sha256_file

ASSET = Path(__file__).resolve().parents[1] / "assets" / "arith_teacher"
STAGE = "teacher_sft"  # the stage that trains it
EVALUATIONS = {"reasoning": "teacher_sft", "fast": "teacher_fast_eval"}  # mode -> the stage that evaluates it
MODEL_KEYS_NOT_IN_RECIPE = ("source", "path", "gguf_file")  # where the weights come from, not how they were made


def recipe_of(cfg: DictConfig) -> dict:
    """What determines the teacher's weights in a composed ``experiment=arith_teacher`` config."""
    stage = next(s for s in resolve_stages(cfg, set(STAGE_KINDS)) if s.name == STAGE)
    model = OmegaConf.to_container(cfg.models[stage.model], resolve=True)
    return {
        "stage": OmegaConf.to_container(stage.config, resolve=True),
        "model": {k: v for k, v in model.items() if k not in MODEL_KEYS_NOT_IN_RECIPE},
        "data": OmegaConf.to_container(stage_data(cfg, stage.config), resolve=True),  # what the teacher read
        "seed": int(cfg.seed),
        "precision": str(cfg.trainer.precision),
    }


def ship(run_dir: Path, dest: Path = ASSET) -> dict:
    """Copy ``run_dir``'s teacher export to ``dest`` (atomically) with ``recipe.json``; returns the recipe."""
    results = read_json(run_dir / "results.json")
    stages = {s["name"]: s for s in results["stages"]}
    missing = [n for n in (STAGE, *EVALUATIONS.values()) if stages.get(n, {}).get("status") != "done"]
    if missing:
        raise SystemExit(f"{run_dir}: stages {missing} are not done (run `kdpipe-train experiment=arith_teacher`)")
    export = run_dir / stages[STAGE]["dir"] / "export"
    cfg = OmegaConf.load(run_dir / "config.yaml")
    recipe = {
        "command": "kdpipe-train experiment=arith_teacher",
        "recipe": recipe_of(cfg),
        "accuracy": {mode: stages[name]["metrics"]["accuracy"] for mode, name in EVALUATIONS.items()},
        "train_seconds": stages[STAGE]["metrics"].get("train_seconds"),
        "weights_sha256": sha256_file(export / "model.safetensors"),
        "trained": {
            "date": time.strftime("%Y-%m-%d", time.gmtime(Path(export / "model.safetensors").stat().st_mtime)),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine(),
        },
    }
    with atomic_dir(dest) as tmp:
        for path in sorted(export.iterdir()):
            shutil.copyfile(path, tmp / path.name)  # plain mode bits: the package ships them readable
        atomic_write_json(tmp / "recipe.json", recipe)
    return recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished `kdpipe-train experiment=arith_teacher` run")
    parser.add_argument("--dest", type=Path, default=ASSET, help=f"where to ship it (default: {ASSET})")
    args = parser.parse_args(argv)
    recipe = ship(args.run_dir.expanduser().resolve(), args.dest)
    print(f"shipped {args.dest}: accuracy {recipe['accuracy']}, sha256 {recipe['weights_sha256'][:12]}")


if __name__ == "__main__":
    main()
