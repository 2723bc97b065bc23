"""Fingerprints of a tokenizer and a model: what a teacher store and a shared stage record, and compare."""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.utils.io import sha256_bytes


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Vocabulary (token -> id, added tokens included), special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "vocab": vocab,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return {
        "sha256": sha256_bytes(json.dumps(payload, sort_keys=True).encode()),
        "vocab_sha256": sha256_bytes(json.dumps(vocab).encode()),
        "chat_template_sha256": sha256_bytes(payload["chat_template"].encode()),
        "vocab_size": len(tokenizer),
    }


def model_fingerprint(model: PreTrainedModel) -> dict:
    """The model's config and a hash over every weight (name, dtype, shape, bytes)."""
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {
        "config_sha256": sha256_bytes(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_sha256": h.hexdigest(),
        "model_type": config.get("model_type"),
    }
