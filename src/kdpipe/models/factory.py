"""Build or load the causal LMs and their tokenizer.

A ``model`` config says where a model comes from:

- ``source: config``: a fresh ``transformers`` model built from ``arch`` (any ``model_type`` that
  ``AutoConfig.for_model`` knows, e.g. ``llama``), sized by the keys under ``arch``;
- ``source: pretrained``: ``from_pretrained(path)`` of a hub id or local directory.

Later stages load the HF export an earlier stage wrote, through the same ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.data.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown model dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def build_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a model config names: ``tokenizer: char`` (built-in) or a hub id / directory.

    A ``source: pretrained`` model uses the tokenizer saved with it unless ``tokenizer`` names another one.
    """
    name = cfg.get("tokenizer") or "char"
    if cfg.get("source") == "pretrained" and name == "char":
        name = cfg.path
    if name == "char":
        return build_char_tokenizer(model_max_length=int(cfg.get("max_position_embeddings", 512)))
    return AutoTokenizer.from_pretrained(name, trust_remote_code=bool(cfg.get("trust_remote_code", False)))


def build_model(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A model as its config describes it (see the module docstring)."""
    dtype = resolve_dtype(cfg.get("dtype"))
    trust = bool(cfg.get("trust_remote_code", False))
    if cfg.source == "pretrained":
        if not cfg.get("path"):
            raise ValueError("model.source=pretrained needs model.path (a hub id or a local directory)")
        return load_model(cfg.path, dtype=dtype, trust_remote_code=trust)
    if cfg.source != "config":
        raise ValueError(f"unknown model.source {cfg.source!r}; choose 'config' or 'pretrained'")
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **arch,
    )
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return model.to(dtype) if dtype is not None else model


def load_model(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with kdpipe's safe defaults."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
