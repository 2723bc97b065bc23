"""Several processes: DDP over gloo on the CPU (and FSDP through a CPU stand-in of Lightning's FSDPStrategy).

The end-to-end tests run the real ``kdpipe-train`` with ``trainer=ddp_cpu``: Lightning's launcher starts the
second rank, both run the whole pipeline (kdpipe.pipeline.launch). They compare a 2-process run with per-rank
batch b against a 1-process run with batch 2b on the same data, seeds and float32 precision:

* loss curves (train/loss at every step, val/loss): equal within ``LOSS_TOLERANCE`` = 1e-4; measured on a
  2-core CPU: at most 1e-6 (DDP and FSDP alike), the float32 rounding of summing the ranks' parts;
* teacher stores: byte-identical files (shards, manifest), when each shard is scored in the same batches;
* writes: an audit hook in every process (tests/write_audit) shows that rank 1 writes its own store shards and
  nothing else; rank 0 writes the run's files.

The tests with several processes are ``slow`` except one scoring run; the rest are in-process checks of the
pieces (loss shares, batch slicing, placeholders, wrap policy, launch refusals).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from safetensors.torch import load_file

from kdpipe.data.collate import Collator, KDCollator
from kdpipe.data.curriculum import CurriculumBatchSampler, MixedBatchSampler, WithPlaceholders, rank_share_of
from kdpipe.types import IGNORE_INDEX, EncodedExample
from kdpipe.losses import combine_terms, fused_sparse_kd_terms, sparse_kd_terms
from kdpipe.models.fsdp import DecoderLayerPolicy
from kdpipe.models.heads import lm_head
from kdpipe.modules.sft import local_denominators, matrix_names, param_groups, rank_share
from kdpipe.lightning import launch
from kdpipe.errors import PipelineConfigError
from kdpipe.pipeline.stages import instantiate_trainer
from kdpipe.store.reader import TeacherRows
from kdpipe.cli.train import train
from kdpipe.utils import dist as kdist
from tests.conftest import compose_cfg

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-4
# what a launcher or an earlier test could leave in the environment: each run here starts clean
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", launch.JOIN_ENV)

TINY = ["debug=fast", "logger=csv", "callbacks=none", "print_config=false", "trainer.log_every_n_steps=1"]
# 25 training examples per style and a global batch of 4: the 7th global batch holds one example, so one of two
# ranks gets a placeholder row there. Shards of 8 examples scored 8 at a time: 4 shards per style, 2 per rank,
# each scored in the same batch as in one process.
SMALL = [
    "data.n_train_per_level=5",
    "pipeline.stages.score.shard_size=8",
    "pipeline.stages.score.batch_size=8",
    *[f"pipeline.stages.{stage}.{key}=8" for stage in ("sft_fast", "kd_fast") for key in ("max_steps", "eval.limit")],
]
ORDER = "pipeline.order=[score,sft_fast,kd_fast]"


def per_rank_batch(size: int) -> list[str]:
    return [f"pipeline.stages.{s}.batch_size={size}" for s in ("sft_fast", "kd_fast")]


ONE_PROCESS = ["trainer=cpu", "trainer.precision=32-true", *per_rank_batch(4)]
DDP = ["trainer=ddp_cpu", *per_rank_batch(2)]
FSDP_ON_CPU = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.strategy._target_=tests.helpers.CPUFSDPStrategy",
    "trainer.strategy.process_group_backend=gloo",
    *per_rank_batch(2),
]


def kdpipe_train(args: list[str], root: Path, audit: Path | None = None, command: list[str] | None = None):
    """``kdpipe-train`` (or ``command``) in a subprocess with its outputs under ``root``; one thread per process,
    so one and two processes compute with the same kernels."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    paths = [str(REPO), *([str(REPO / "tests" / "write_audit")] if audit else []), env.get("PYTHONPATH", "")]
    env.update(KDPIPE_ROOT=str(root), WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        env["KDPIPE_WRITE_AUDIT"] = str(audit)
    proc = subprocess.run(
        command or [str(BIN / "kdpipe-train"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def loss_curves(stage_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """train/loss and val/loss by step from a stage's CSV log."""
    with open(stage_dir / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val_loss = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    return train_loss, val_loss


def assert_same_curves(reference: Path, other: Path) -> float:
    """Both runs log the same steps with losses within the tolerance; returns the largest difference."""
    worst = 0.0
    for stage in ("02_sft_fast", "03_kd_fast"):
        for ref, got in zip(loss_curves(reference / stage), loss_curves(other / stage)):
            assert sorted(ref) == sorted(got) and ref, stage
            worst = max(worst, *(abs(ref[s] - got[s]) for s in ref))
    assert worst <= LOSS_TOLERANCE
    return worst


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of every store under ``root/logs/stores``, by relative path."""
    stores = root / "logs" / "stores"
    return {str(p.relative_to(stores)): p.read_bytes() for p in sorted(stores.rglob("*")) if p.is_file()}


def audited_writes(folder: Path) -> dict[int, set[str]]:
    """Paths each rank's processes opened for writing or renamed into place (tests/write_audit)."""
    writes: dict[int, set[str]] = {}
    for log in folder.glob("writes-*.txt"):
        lines = log.read_text().splitlines()
        rank = int(lines[0].split()[1])
        writes.setdefault(rank, set()).update(line.split(" ", 1)[1] for line in lines[1:])
    return writes


# ---------------------------------------------------------------------------------------------- in process


def _sparse_teacher(shape: tuple[int, int], vocab: int, k: int, generator: torch.Generator):
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(shape[0] * shape[1])])
    probs = torch.softmax(torch.randn(shape[0] * shape[1], k + 1, generator=generator, dtype=torch.float64), -1)
    return ids.view(*shape, k), probs[:, :k].log().view(*shape, k), probs[:, k].log().view(shape)


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_rank_shares_average_to_the_global_batch_loss_and_gradient(impl, normalize, ce_weight):
    """What DDP does with the ranks' losses (the mean of their gradients) gives the global batch's gradient,
    whatever the label and teacher positions per rank; one rank holds no label at all."""
    g = torch.Generator().manual_seed(0)
    rows, length, hidden_size, vocab, k, world = 6, 7, 8, 13, 4, 3
    hidden = torch.randn(rows, length, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.4] = IGNORE_INDEX
    labels[[2, 5]] = IGNORE_INDEX  # rank 2's rows: nothing to learn
    has_teacher = (labels != IGNORE_INDEX) & (torch.rand(rows, length, generator=g) < 0.7)
    ids, logprobs, tail = _sparse_teacher((rows, length), vocab, k, g)
    options = {"normalize": normalize}

    def loss(part: list[int], weight_of_ce: float) -> torch.Tensor:
        batch = (ids[part], logprobs[part], tail[part], labels[part])
        if impl == "fused":
            return fused_sparse_kd_terms(
                hidden[part], weight, *batch, has_teacher=has_teacher[part], ce_weight=weight_of_ce, **options
            ).loss
        terms = sparse_kd_terms(hidden[part] @ weight.t(), *batch, has_teacher=has_teacher[part], ce_weight=ce_weight)
        return combine_terms(terms, ce_weight=weight_of_ce, **options)

    everything = loss(list(range(rows)), ce_weight)
    (expected,) = torch.autograd.grad(everything, weight)
    parts = [[0, 3], [1, 4], [2, 5]]
    local = [local_denominators(labels[p], has_teacher[p], normalize) for p in parts]
    total = torch.stack(local).sum(0)
    shares = [rank_share(n, total, ce_weight, world) for n in local]
    assert shares[2] == (0.0, ce_weight)
    losses = [scale * loss(p, w) for p, (scale, w) in zip(parts, shares)]
    averaged = sum(losses) / world
    (got,) = torch.autograd.grad(averaged, weight)
    assert torch.allclose(averaged, everything, atol=1e-12)
    assert torch.allclose(got, expected, atol=1e-12)


def _examples(n: int) -> list[EncodedExample]:
    return [EncodedExample(f"e{i}", [1, 2, 3, 4 + i % 5], [-100, 2, 3, 4], level=i % 3) for i in range(n)]


def test_two_ranks_split_every_global_batch_of_the_one_process_plan():
    n = 25
    one = CurriculumBatchSampler([0.0] * n, [4] * n, num_batches=8, batch_size=4, seed=3)
    difficulty, lengths = [0.0] * n, [4] * n
    ranks = [
        CurriculumBatchSampler(difficulty, lengths, 8, batch_size=2, seed=3, num_replicas=2, rank=r) for r in (0, 1)
    ]
    assert ranks[0].global_plan == ranks[1].global_plan == one.global_plan
    assert [len(b) for b in one.global_plan] == [4, 4, 4, 4, 4, 4, 1, 4]  # a pass of 25 ends with one example
    for t, batch in enumerate(one.global_plan):
        mine, theirs = ranks[0].plan[t], ranks[1].plan[t]
        real = [i for i in mine + theirs if i < n]
        assert sorted(real) == sorted(batch) and len(set(real)) == len(real)
        if len(batch) == 1:  # rank 1 has no row: a placeholder of the batch's example
            assert mine == batch and theirs == [n + batch[0]]
    dataset = WithPlaceholders(_examples(n))
    ghost = dataset[n + 6]
    assert ghost.input_ids == dataset[6].input_ids and ghost.num_label_tokens == 0 and ghost.id == "e6"
    with pytest.raises(IndexError):
        dataset[2 * n]


def test_mixed_batches_split_the_same_way():
    pool = [CurriculumBatchSampler([0.0] * m, [4] * m, 5, batch_size=6, seed=1) for m in (20, 7)]
    one = MixedBatchSampler(*pool, ratio=0.5, offset=20)
    ranks = [MixedBatchSampler(*pool, ratio=0.5, offset=20, num_replicas=2, rank=r) for r in (0, 1)]
    for t, batch in enumerate(one.global_plan):
        assert sorted(ranks[0].plan[t] + ranks[1].plan[t]) == sorted(batch)


def test_validation_rows_are_split_evenly_with_placeholders():
    rows = _examples(5)
    shares = [rank_share_of(rows, r, 2) for r in (0, 1)]
    assert [len(s) for s in shares] == [3, 3]
    assert [e.id for e in shares[0]] == ["e0", "e2", "e4"] and [e.id for e in shares[1][:2]] == ["e1", "e3"]
    assert shares[1][2].num_label_tokens == 0
    assert [len(rank_share_of(rows[:1], r, 2)) for r in (0, 1)] == [1, 1]  # every rank validates something


def test_kd_collator_asks_the_store_nothing_for_a_placeholder_row():
    asked: list[list[str]] = []

    class Store:
        k = 2

        def get_many(self, ids):
            asked.append(list(ids))
            n = 3 * len(ids)
            rows = TeacherRows(torch.ones(n, 2, dtype=torch.long), torch.zeros(n, 2), torch.zeros(n), torch.zeros(n))
            return rows, [3] * len(ids)

    examples = WithPlaceholders(_examples(2))
    collate = KDCollator(Collator(0), Store())
    batch = collate([examples[0], examples[3]])  # example 0 and a placeholder of example 1
    assert asked == [["e0"]]
    assert batch["has_teacher"][0].sum() == 3 and batch["has_teacher"][1].sum() == 0
    alone = collate([examples[2]])  # a rank whose only row is a placeholder
    assert asked == [["e0"]] and alone["has_teacher"].sum() == 0


def _tiny_llama(tied: bool = True):
    from tests.helpers import tiny_llama

    return tiny_llama(vocab_size=20, hidden_size=8, intermediate_size=16, tie_word_embeddings=tied, seed=None).train()


def test_weight_decay_groups_survive_fsdp_flattening():
    """FSDP hands the optimizer flat 1-D shards named through its wrappers: the names recorded before wrapping
    still pick the matrices."""
    matrices = matrix_names(torch.nn.Linear(3, 4))
    flat, inner = torch.nn.Module(), torch.nn.Module()
    flat._fsdp_wrapped_module = inner
    inner.weight = torch.nn.Parameter(torch.zeros(12))
    inner.bias = torch.nn.Parameter(torch.zeros(4))
    decay, no_decay = param_groups(flat, 0.1, matrices)
    assert decay["params"] == [inner.weight] and no_decay["params"] == [inner.bias]
    assert param_groups(flat, 0.1)[0]["params"] == []  # by shape alone nothing would be decayed


def test_wrap_policy_wraps_the_decoder_layers_and_nothing_else():
    model = _tiny_llama()
    policy = DecoderLayerPolicy()
    assert policy(model, recurse=True)  # the root: recurse, and learn the layer classes
    wrapped = {name for name, module in model.named_modules() if module is not model and policy(module, False)}
    assert wrapped == {"model.layers.0", "model.layers.1"}
    assert DecoderLayerPolicy(["LlamaMLP"])(model.model.layers[0].mlp, False)
    # the same policy as trainer.strategy.activation_checkpointing_policy: torch wraps each layer for recomputation
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    apply_activation_checkpointing(model, auto_wrap_policy=DecoderLayerPolicy())
    assert [type(layer) for layer in model.model.layers] == [CheckpointWrapper] * 2
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 2  # and nothing else
    with pytest.raises(ValueError, match="layer_classes"):
        DecoderLayerPolicy()(torch.nn.Linear(2, 2), True)


def test_a_sharded_lm_head_weight_is_refused_with_the_fix():
    model = _tiny_llama(tied=False)
    weight, _ = lm_head(model)
    assert weight.shape == (20, 8)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(80))  # what FSDP leaves outside the forward
    with pytest.raises(ValueError, match=r"sharded parameter .*decoder layers"):
        lm_head(model)


@pytest.mark.parametrize("name", ["ddp_cpu", "ddp", "fsdp", "deepspeed", "default", "gpu"])
def test_trainer_configs_compose_with_num_nodes(name, tmp_path):
    cfg = compose_cfg([f"trainer={name}"], tmp_path)
    assert cfg.trainer.num_nodes == 1
    target = str(cfg.trainer.get("strategy", {}).get("_target_", ""))
    if name == "fsdp":
        assert target.endswith("FSDPStrategy") and cfg.trainer.strategy.state_dict_type == "full"
        assert isinstance(instantiate(cfg.trainer.strategy.auto_wrap_policy), DecoderLayerPolicy)
        assert instantiate(cfg.trainer.strategy).kwargs["use_orig_params"] is True
    if name == "ddp":
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy._process_group_backend == "nccl" and strategy._ddp_kwargs["find_unused_parameters"] is False
    if name == "deepspeed":
        assert target.endswith("DeepSpeedStrategy") and cfg.trainer.strategy.stage == 2


def test_ddp_cpu_builds_a_two_process_gloo_trainer_without_starting_anything(tmp_path):
    cfg = compose_cfg(["trainer=ddp_cpu"], tmp_path)
    trainer = instantiate_trainer(cfg.trainer, logger=False)
    strategy = trainer.strategy
    assert type(strategy).__name__ == "DDPStrategy" and strategy.num_processes == 2
    assert strategy._process_group_backend == "gloo" and trainer.precision == "32-true"
    assert not kdist.is_initialized()


def test_deepspeed_needs_its_extra_and_stage_3_is_refused(tmp_path):
    cfg = compose_cfg(["trainer=deepspeed"], tmp_path)
    if launch.importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(PipelineConfigError, match=r"kdpipe\[deepspeed\]"):
            launch.check_strategy(cfg.trainer)
    cfg.trainer.strategy.stage = 3
    with pytest.raises(PipelineConfigError, match="stage 3"):
        launch.check_strategy(cfg.trainer)


def test_launches_that_cannot_run_a_pipeline_are_refused_before_any_process_starts(tmp_path, monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "ENTRY_POINT", False)
    spawn = compose_cfg(["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"], tmp_path)
    with pytest.raises(PipelineConfigError, match="strategy=ddp"):
        launch.start_ranks(spawn)
    with pytest.raises(PipelineConfigError, match="kdpipe-train"):  # no command line to re-run for the ranks
        launch.start_ranks(compose_cfg(["trainer=ddp_cpu"], tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineConfigError, match="WORLD_SIZE"):  # e.g. torchrun with trainer.devices=1
        launch.start_ranks(compose_cfg(["trainer=cpu"], tmp_path))
    monkeypatch.delenv("WORLD_SIZE")
    job = launch.start_ranks(compose_cfg(["trainer=cpu"], tmp_path))
    assert not job.owns_group and not kdist.is_initialized()
    assert all(var not in os.environ for var in LAUNCH_VARS)


def test_rank_helpers_read_the_launchers_environment(monkeypatch):
    for var in (*LAUNCH_VARS, "SLURM_PROCID", "JSM_NAMESPACE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert kdist.global_rank() == 0 and kdist.is_rank_zero() and kdist.world_size() == 1
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child of Lightning's launcher
    assert kdist.global_rank() == 1 and not kdist.is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # the launching process of a second machine
    assert not kdist.is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert kdist.global_rank() == 5
    monkeypatch.setenv("RANK", "3")
    assert kdist.global_rank() == 3
    # without a process group the collectives are the one-process answers
    kdist.barrier()
    assert kdist.broadcast_object({"a": 1}) == {"a": 1}
    assert kdist.run_on_rank_zero(lambda x: x + 1, 1) == 2
    assert kdist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def _two_rank_helpers(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of a 2-process gloo group: the helpers' collectives, and a failure on rank 0."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {"rank": kdist.global_rank(), "zero": kdist.is_rank_zero(), "world": kdist.world_size()}
        result["sum"] = kdist.all_reduce_sum(torch.tensor([rank + 1.0])).item()
        result["broadcast"] = kdist.broadcast_object(f"from {rank}")
        result["rank_zero"] = kdist.run_on_rank_zero(lambda: kdist.global_rank())
        kdist.barrier()

        def fail():
            raise ValueError("export failed")

        try:
            kdist.run_on_rank_zero(fail)
        except Exception as err:  # rank 0: its own error; rank 1: told, instead of waiting forever
            result["error"] = f"{type(err).__name__}: {err}"
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_rank_helpers_in_a_two_process_group(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_helpers, args=(port, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (zero["rank"], zero["zero"], one["rank"], one["zero"]) == (0, True, 1, False)
    assert zero["world"] == one["world"] == 2 and zero["sum"] == one["sum"] == 3.0
    assert zero["broadcast"] == one["broadcast"] == "from 0" and zero["rank_zero"] == one["rank_zero"] == 0
    assert zero["error"] == "ValueError: export failed"
    assert one["error"] == "RankZeroError: rank 0 failed: ValueError: export failed"


def test_two_processes_score_the_same_store_as_one(tiny_cfg, tmp_path):
    """The real launch path at its cheapest: 2 ranks score 4 shards each of 2 styles (2 per rank), one
    manifest over them; the files equal those one in-process run writes."""
    train(tiny_cfg("pipeline.order=[score]", *SMALL[:3]))
    root = tmp_path / "ddp"
    root.mkdir()
    kdpipe_train([*TINY, "pipeline.order=[score]", *SMALL[:3], "trainer=ddp_cpu", f"hydra.run.dir={root}/run"], root)
    one, two = store_files(tmp_path), store_files(root)
    assert sorted(one) == sorted(two) and one == two
    manifests = [json.loads(v) for k, v in two.items() if k.endswith("manifest.json")]
    assert len(manifests) == 2 and all(len(m["shards"]) == 4 for m in manifests)
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["stages"][0]["status"] == "done"
    assert not list(Path(root).glob("logs/runs/*"))  # no second run dir from the other rank


# ------------------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 4: score, SFT, KD."""
    root = tmp_path_factory.mktemp("one")
    kdpipe_train([*TINY, ORDER, *SMALL, *ONE_PROCESS, f"hydra.run.dir={root}/run"], root)
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two DDP processes with batch 2 each, every process's writes audited."""
    root = tmp_path_factory.mktemp("ddp")
    kdpipe_train([*TINY, ORDER, *SMALL, *DDP, f"hydra.run.dir={root}/run"], root, audit=root / "audit")
    return root


@pytest.mark.slow
def test_ddp_sft_and_kd_follow_the_one_process_loss_curve(reference, ddp_run):
    worst = assert_same_curves(reference / "run", ddp_run / "run")
    print(f"largest loss difference, DDP vs one process: {worst:.2e}")
    metrics = json.loads((ddp_run / "run" / "03_kd_fast" / "metrics.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["steps"] == 8


@pytest.mark.slow
def test_ddp_score_writes_the_one_process_store(reference, ddp_run):
    one, two = store_files(reference), store_files(ddp_run)
    assert sorted(one) == sorted(two) and one == two


@pytest.mark.slow
def test_only_rank_zero_writes_the_runs_files(reference, ddp_run):
    writes = audited_writes(ddp_run / "audit")
    assert set(writes) == {0, 1}
    inside = {rank: {p for p in paths if p.startswith(str(ddp_run))} for rank, paths in writes.items()}
    stores = ddp_run / "logs" / "stores"
    # rank 1: its own shards (odd indices) of both stores, nothing else
    assert inside[1] and all(Path(p).parent.parent == stores for p in inside[1])
    assert {Path(p).name for p in inside[1]} == {"shard-00001.safetensors", "shard-00003.safetensors"}
    shards = {Path(p).name for p in inside[0] if Path(p).name.startswith("shard-")}
    assert shards == {"shard-00000.safetensors", "shard-00002.safetensors"}
    run = ddp_run / "run"
    for name in ("pipeline_state.json", "results.json", "config.yaml", "03_kd_fast/export", "03_kd_fast/metrics.json"):
        assert str(run / name) in inside[0], name
    # the same files as one process's run (nothing per rank), and no launch file left behind
    files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts}
    expected = {str(p.relative_to(reference / "run")) for p in (reference / "run").rglob("*") if p.is_file()}
    assert files == expected
    joins = [p for p in writes[0] if Path(p).name.startswith("kdpipe-join-")]
    assert joins and not any(Path(p).exists() for p in joins)


@pytest.mark.slow
def test_fsdp_on_cpu_follows_the_one_process_run_and_exports_whole_weights(reference, tmp_path):
    """Lightning's FSDP (through tests.helpers.CPUFSDPStrategy) with one unit per decoder layer: the fused loss
    reads the LM head inside the root unit's forward; exports gather the full weights on rank 0."""
    kdpipe_train([*TINY, ORDER, *SMALL, *FSDP_ON_CPU, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    worst = assert_same_curves(reference / "run", tmp_path / "run")
    print(f"largest loss difference, FSDP vs one process: {worst:.2e}")
    assert store_files(reference) == store_files(tmp_path)
    for stage in ("02_sft_fast", "03_kd_fast"):
        ref = load_file(reference / "run" / stage / "export" / "model.safetensors")
        got = load_file(tmp_path / "run" / stage / "export" / "model.safetensors")
        assert ref.keys() == got.keys()
        for key in ref:
            assert ref[key].shape == got[key].shape and torch.allclose(ref[key], got[key], atol=1e-4), key


@pytest.mark.slow
def test_a_multirun_starts_fresh_ranks_for_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*TINY, "pipeline.order=[sft_fast]", *SMALL[:1], "pipeline.stages.sft_fast.max_steps=2"]
    kdpipe_train(["-m", *args, "trainer=ddp_cpu", "seed=1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    losses = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "01_sft_fast" / "metrics.json").read_text())["metrics"]
        assert metrics["world_size"] == 2 and metrics["steps"] == 2
        losses.append(metrics["train_loss"])
        assert (sweep / job / "results.json").exists()
    assert losses[0] != losses[1]  # each job ran its own seed
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "logs" / "runs").exists()


@pytest.mark.slow
def test_ranks_started_by_torchrun_share_rank_zeros_run_dir(tmp_path):
    """torchrun starts both ranks; each composes its own config (run dirs from ${now} may differ by a second),
    they run in rank 0's, and only rank 0's Hydra writes its config copy and log."""
    command = [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "kdpipe.cli.train"]
    args = [*TINY, "pipeline.order=[sft_fast]", *SMALL[:1], "pipeline.stages.sft_fast.max_steps=2", "trainer=ddp_cpu"]
    kdpipe_train([], tmp_path, command=[*command, *args])
    runs = [p for p in (tmp_path / "logs" / "runs").iterdir() if any(p.iterdir())]
    assert len(runs) == 1
    assert (runs[0] / "results.json").exists() and (runs[0] / ".hydra").is_dir()
    assert json.loads((runs[0] / "01_sft_fast" / "metrics.json").read_text())["metrics"]["world_size"] == 2


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_where_it_stopped(reference, tmp_path):
    marker = tmp_path / "crashed"
    crash = "+callbacks.crash={_target_: tests.helpers.CrashEveryRankAt, stage: 03_kd_fast, step: 4, marker: '%s'}"
    crash %= marker
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(KDPIPE_ROOT=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "kdpipe-train"), *TINY, ORDER, *SMALL, *DDP, crash, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "simulated crash" in proc.stdout + proc.stderr
    state = json.loads((run / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "running"]
    kdpipe_train([f"resume={run}"], tmp_path)
    state = json.loads((run / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "done"]
    ref = load_file(reference / "run" / "03_kd_fast" / "export" / "model.safetensors")
    got = load_file(run / "03_kd_fast" / "export" / "model.safetensors")
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-4), key
