"""Fingerprints that tie a teacher store to the teacher, the tokenizer and the exact token sequences.

A store is only valid for the sequences it was computed on: the reader compares these fingerprints with the
student's tokenizer and dataset and refuses a mismatch, naming what differs.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdpipe.data.encode import EncodedExample


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Vocabulary (token -> id, added tokens included), special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "vocab": vocab,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return {
        "sha256": _sha(json.dumps(payload, sort_keys=True).encode()),
        "vocab_sha256": _sha(json.dumps(vocab).encode()),
        "chat_template_sha256": _sha(payload["chat_template"].encode()),
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
        "config_sha256": _sha(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_sha256": h.hexdigest(),
        "model_type": config.get("model_type"),
    }


def data_fingerprint(examples: list[EncodedExample]) -> dict:
    """Example ids with a hash of each one's tokens and labels, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.id.encode())
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return {"sha256": h.hexdigest(), "num_examples": len(examples)}


def example_token_hash(example: EncodedExample) -> str:
    """A short hash of one example's tokens and labels (stored per example, checked on join)."""
    return _sha(json.dumps([example.input_ids, example.labels]).encode())[:16]
