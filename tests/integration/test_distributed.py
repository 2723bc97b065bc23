"""Several processes: DDP over gloo on the CPU (and FSDP through a CPU stand-in of Lightning's FSDPStrategy).

The end-to-end tests run the real ``kdpipe-train`` with ``trainer=ddp_cpu``: Lightning's launcher starts the
second rank, both run the whole pipeline (kdpipe.lightning.launch). They compare a 2-process run with per-rank
batch b against a 1-process run with batch 2b on the same data, seeds and float32 precision:

* loss curves (train/loss at every step, val/loss): equal within ``LOSS_TOLERANCE`` = 1e-4; measured on a
  2-core CPU: at most 1e-6 (DDP and FSDP alike), the float32 rounding of summing the ranks' parts;
* teacher stores: byte-identical files (shards, manifest), when each shard is scored in the same batches;
* writes: an audit hook in every process (tests/write_audit) shows that rank 1 writes its own store shards and
  nothing else; rank 0 writes the run's files.

The tests with several processes are ``slow`` except one scoring run and the rank helpers in a two-process
group. The in-process checks of the pieces are unit tests: loss shares (unit/modules/test_rank_shares.py),
batch slicing and placeholders (unit/data/test_rank_shares.py), the wrap policy (unit/models/test_fsdp.py),
trainers and launch refusals (unit/lightning/), rank helpers (unit/utils/test_dist.py).
"""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdpipe.cli.train import train
from kdpipe.utils import dist as kdist
from tests.helpers import TinyConfig, assert_same_weights, crash_override, run_cli

LOSS_TOLERANCE = 1e-4
LOG_EVERY_STEP = "trainer.log_every_n_steps=1"  # loss curves compared step by step
# 25 training examples per style and a global batch of 4: the 7th global batch holds one example, so one of two
# ranks gets a placeholder row there. Shards of 8 examples scored 8 at a time: 4 shards per style, 2 per rank,
# each scored in the same batch as in one process.
SCORE_SIZES = ["data.n_train_per_level=5", "pipeline.stages.score.shard_size=8", "pipeline.stages.score.batch_size=8"]
SIZES = [
    *SCORE_SIZES,
    *[f"pipeline.stages.{stage}.{key}=8" for stage in ("sft_fast", "kd_fast") for key in ("max_steps", "eval.limit")],
]
ORDER = "pipeline.order=[score,sft_fast,kd_fast]"


def per_rank_batch(size: int) -> list[str]:
    return [f"pipeline.stages.{s}.batch_size={size}" for s in ("sft_fast", "kd_fast")]


# the same global batch of 4 on one process, two DDP processes, and two FSDP processes
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


def pipeline_args(root: Path, *overrides: str) -> list[str]:
    """The compared pipeline (score, SFT, KD at :data:`SIZES`) as a kdpipe-train command line, run in ``root/run``."""
    return TinyConfig(root).args(LOG_EVERY_STEP, ORDER, *SIZES, *overrides, f"hydra.run.dir={root}/run")


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


# ------------------------------------------------------------------------------------------ two processes


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


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_rank_helpers_in_a_two_process_group(tmp_path):
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


@pytest.mark.slow  # make test-all (trimmed from make test to keep it under 15 min)
def test_two_processes_score_the_same_store_as_one(tiny_cfg, tmp_path):
    """The real launch path at its cheapest: 2 ranks score 4 shards each of 2 styles (2 per rank), one
    manifest over them; the files equal those one in-process run writes."""
    train(tiny_cfg("pipeline.order=[score]", *SCORE_SIZES))
    root = tmp_path / "ddp"
    root.mkdir()
    args = TinyConfig(root).args("pipeline.order=[score]", *SCORE_SIZES, "trainer=ddp_cpu", f"hydra.run.dir={root}/run")
    run_cli("kdpipe-train", *args, cwd=root)
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
    run_cli("kdpipe-train", *pipeline_args(root, *ONE_PROCESS), cwd=root)
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two DDP processes with batch 2 each, every process's writes audited."""
    root = tmp_path_factory.mktemp("ddp")
    run_cli("kdpipe-train", *pipeline_args(root, *DDP), cwd=root, audit=root / "audit")
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
    run_cli("kdpipe-train", *pipeline_args(tmp_path, *FSDP_ON_CPU), cwd=tmp_path)
    worst = assert_same_curves(reference / "run", tmp_path / "run")
    print(f"largest loss difference, FSDP vs one process: {worst:.2e}")
    assert store_files(reference) == store_files(tmp_path)
    for stage in ("02_sft_fast", "03_kd_fast"):
        assert_same_weights(reference / "run" / stage / "export", tmp_path / "run" / stage / "export", atol=1e-4)


@pytest.mark.slow
def test_a_multirun_starts_fresh_ranks_for_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = TinyConfig(tmp_path).args("pipeline.order=[sft_fast]", SIZES[0], "pipeline.stages.sft_fast.max_steps=2")
    run_cli("kdpipe-train", "-m", *args, "trainer=ddp_cpu", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
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
    args = TinyConfig(tmp_path).args(
        "pipeline.order=[sft_fast]", SIZES[0], "pipeline.stages.sft_fast.max_steps=2", "trainer=ddp_cpu"
    )
    run_cli("torchrun", "--nproc_per_node=2", "-m", "kdpipe.cli.train", *args, cwd=tmp_path)
    runs = [p for p in (tmp_path / "logs" / "runs").iterdir() if any(p.iterdir())]
    assert len(runs) == 1
    assert (runs[0] / "results.json").exists() and (runs[0] / ".hydra").is_dir()
    assert json.loads((runs[0] / "01_sft_fast" / "metrics.json").read_text())["metrics"]["world_size"] == 2


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_where_it_stopped(reference, tmp_path):
    crash = crash_override("03_kd_fast", 4, tmp_path / "crashed", every_rank=True)
    run = tmp_path / "run"
    proc = run_cli("kdpipe-train", *pipeline_args(tmp_path, *DDP, crash), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "simulated crash" in proc.stdout + proc.stderr
    state = json.loads((run / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "running"]
    run_cli("kdpipe-train", f"resume={run}", cwd=tmp_path)
    state = json.loads((run / "pipeline_state.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done", "done"]
    assert_same_weights(reference / "run" / "03_kd_fast" / "export", run / "03_kd_fast" / "export", atol=1e-4)
