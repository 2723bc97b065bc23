"""Writing a teacher store: sharded safetensors files plus ``manifest.json``, atomic and resumable.

The examples to score are cut into shards of ``shard_size`` consecutive examples; shard ``i`` belongs to rank
``i % world_size``. Each shard holds, for its examples in order, the codec's arrays (:mod:`kdpipe.store.codec`)
with ``offsets`` [n_examples + 1] (each example's rows); its header metadata lists the example ids and token
hashes. Examples are quantised as they are added and entropy-coded when their shard is full (the v2 codec's
models are fitted per shard).
A shard is written to a temp name and renamed, so a shard file that exists is complete: a re-run after a
crash keeps those and scores only the rest. Shard bytes depend only on their content, so an interrupted and
resumed store is byte-identical to an uninterrupted one. Rank 0 writes the manifest once every shard exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from kdpipe.store import codec
from kdpipe.store.fingerprint import example_token_hash
from kdpipe.types import EncodedExample
from kdpipe.utils.io import atomic_file, atomic_write_json, read_json, sha256_file

FORMAT = "kdpipe-teacher-store"
VERSION = 2  # 2: the shard arrays are the codec's (v2 codec: per-example streams); 1: row-aligned v1 arrays
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PENDING = "store_meta.json"  # written first: what this store is, so a resume can check it continues the same one


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class StoreWriter:
    """Collects per-example teacher rows and writes complete shards as they fill.

    Args:
        path: the store directory.
        examples: every example to score, in store order (the shard plan depends on it).
        meta: what the store is (teacher, tokenizer and data fingerprints, k, temperature, ...).
        spec: the codec spec (vocab size, k, encoding).
        shard_size: examples per shard.
        rank, world_size: this process's share of the shards.
    """

    def __init__(
        self,
        path: str | Path,
        examples: list[EncodedExample],
        meta: dict,
        spec: codec.CodecSpec,
        shard_size: int = 1024,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path, self.examples, self.spec = Path(path), examples, spec
        self.shard_size, self.rank, self.world_size = shard_size, rank, world_size
        self.meta = {**meta, "codec": spec.to_dict(), "shard_size": shard_size, "num_examples": len(examples)}
        self.num_shards = max(1, -(-len(examples) // shard_size))
        self._buffers: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_or_write_meta()

    def _check_or_write_meta(self) -> None:
        pending = self.path / PENDING
        if pending.exists():
            saved = read_json(pending)
            if saved.get("codec") != self.meta["codec"] and saved.get("codec", {}).get("scheme") in codec.SCHEMES:
                # a store begun with another codec (e.g. before an upgrade) is finished in that codec
                self.spec = codec.CodecSpec.from_dict(saved["codec"])
                self.meta["codec"] = self.spec.to_dict()
            if saved != json.loads(json.dumps(self.meta)):
                differ = sorted(k for k in set(saved) | set(self.meta) if saved.get(k) != self.meta.get(k))
                raise ValueError(f"{self.path} holds a different teacher store (differs in {differ}); use another path")
        elif self.rank == 0:
            atomic_write_json(pending, self.meta)

    def shard_examples(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.examples)))

    def is_complete(self, shard: int) -> bool:
        return (self.path / shard_name(shard)).exists()

    def pending_shards(self, rank: int | None = None) -> list[int]:
        """Shards of this rank (or of ``rank``) that still have to be written."""
        rank = self.rank if rank is None else rank
        return [s for s in range(self.num_shards) if s % self.world_size == rank and not self.is_complete(s)]

    def pending_examples(self, rank: int | None = None) -> list[int]:
        """Indices (into ``examples``) this rank (or ``rank``) still has to score, in order."""
        return [i for s in self.pending_shards(rank) for i in self.shard_examples(s)]

    def add(
        self,
        index: int,
        topk_ids: torch.Tensor,
        topk_logprobs: torch.Tensor,
        tail_logprob: torch.Tensor,
        label_logprob: torch.Tensor,
    ) -> None:
        """Add one example's rows (one per label position); writes its shard when the shard is full."""
        example = self.examples[index]
        if topk_ids.shape[0] != example.num_label_tokens:
            raise ValueError(
                f"example {example.id!r}: {topk_ids.shape[0]} teacher rows for {example.num_label_tokens} labels"
            )
        shard = index // self.shard_size
        prepared = codec.prepare(self.spec, topk_ids, topk_logprobs, tail_logprob, label_logprob)
        self._buffers.setdefault(shard, {})[index] = prepared
        if len(self._buffers[shard]) == len(self.shard_examples(shard)):
            self._write_shard(shard)

    def _write_shard(self, shard: int) -> None:
        rows = self._buffers.pop(shard)
        indices = list(self.shard_examples(shard))
        tensors = codec.encode_shard(self.spec, [rows[i] for i in indices])
        # one metadata key: safetensors writes header metadata from a hash map, so several keys would come out
        # in a different order in each process and the shard bytes would no longer be reproducible
        metadata = {
            "kdpipe": json.dumps(
                {
                    "shard": shard,
                    "ids": [self.examples[i].id for i in indices],
                    "token_hashes": [example_token_hash(self.examples[i]) for i in indices],
                },
                sort_keys=True,
            )
        }
        final = self.path / shard_name(shard)
        # a temp name of this process's own: two jobs scoring the same store at once write identical shards,
        # and each rename is atomic, so whichever lands last leaves a complete, correct file
        with atomic_file(final) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)

    def finalize(self) -> Path:
        """Write ``manifest.json`` (rank 0) once every shard exists; returns its path."""
        if self._buffers:
            raise RuntimeError(f"shards {sorted(self._buffers)} were not completed: some examples were never added")
        missing = [s for s in range(self.num_shards) if not self.is_complete(s)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: shards {missing} are missing")
        manifest = {"format": FORMAT, "version": VERSION, **self.meta, "shards": []}
        from safetensors import safe_open

        for s in range(self.num_shards):
            file = self.path / shard_name(s)
            with safe_open(str(file), framework="np") as f:
                rows = int(f.get_tensor("offsets")[-1])
            manifest["shards"].append(
                {"file": file.name, "examples": len(self.shard_examples(s)), "rows": rows, "sha256": sha256_file(file)}
            )
        manifest["total_rows"] = sum(s["rows"] for s in manifest["shards"])
        atomic_write_json(self.path / MANIFEST, manifest)
        return self.path / MANIFEST
