"""Fingerprints that tie a teacher store to the exact token sequences (the teacher's and the tokenizer's are
:mod:`kdpipe.models.fingerprint`).

A store is only valid for the sequences it was computed on: the reader compares these fingerprints with the
student's tokenizer and dataset and refuses a mismatch, naming what differs.
"""

from __future__ import annotations

import hashlib
import json

from kdpipe.types import EncodedExample
from kdpipe.utils.io import sha256_bytes


def data_fingerprint(examples: list[EncodedExample]) -> dict:
    """Example ids with a hash of each one's tokens and labels, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.id.encode())
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return {"sha256": h.hexdigest(), "num_examples": len(examples)}


def example_token_hash(example: EncodedExample) -> str:
    """A short hash of one example's tokens and labels (stored per example, checked on join)."""
    return sha256_bytes(json.dumps([example.input_ids, example.labels]).encode())[:16]
