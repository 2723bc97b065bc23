"""Reading a teacher store: memory-mapped shards, random access by example id, verified before use.

``TeacherStore(path)`` reads the manifest and the shards' headers (ids), not their data. Rows are sliced out
of the memory-mapped safetensors files on demand. Each shard's sha256 is checked the first time it is read
(``verify=True``), and :meth:`TeacherStore.check_compatible` refuses a store made with another tokenizer or on
other token sequences, naming what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from kdpipe import errors
from kdpipe.models.fingerprint import tokenizer_fingerprint
from kdpipe.store import codec
from kdpipe.store.fingerprint import example_token_hash
from kdpipe.store.writer import FORMAT, MANIFEST, READABLE_VERSIONS
from kdpipe.types import EncodedExample
from kdpipe.utils.io import read_json, sha256_file


class StoreError(errors.StoreError):
    """A teacher store that is missing, corrupt, or does not match the data it is used with."""


@dataclass
class TeacherRows:
    """The teacher signal of one example: one row per label position, in position order."""

    topk_ids: torch.Tensor  # [n, k] int64
    topk_logprobs: torch.Tensor  # [n, k] float32
    tail_logprob: torch.Tensor  # [n] float32
    label_logprob: torch.Tensor  # [n] float32


class TeacherStore:
    """A finished teacher store, opened for reading."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise StoreError(f"{self.path} is not a finished teacher store: no {MANIFEST}")
        try:
            self.manifest = read_json(manifest_path)
        except (ValueError, OSError) as err:
            raise StoreError(f"{manifest_path} cannot be read ({err}): the store is damaged") from err
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{manifest_path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')}, "
                f"expected {FORMAT!r} v{' or v'.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            self.spec = codec.CodecSpec.from_dict(self.manifest["codec"])
        except (KeyError, ValueError) as err:
            raise StoreError(f"{manifest_path}: codec {self.manifest.get('codec')!r} cannot be read ({err})") from err
        self.verify = verify
        self._verified: set[int] = set()
        self._shards: dict[int, codec.Shard] = {}
        self.index: dict[str, tuple[int, int]] = {}
        self.token_hashes: dict[str, str] = {}
        for shard_idx, shard in enumerate(self.manifest["shards"]):
            file = self.path / shard["file"]
            if not file.exists():
                raise StoreError(f"teacher store {self.path}: shard {shard['file']} is missing")
            with safe_open(str(file), framework="np") as f:
                meta = f.metadata() or {}
            header = json.loads(meta.get("kdpipe", "{}"))
            ids, hashes = header.get("ids", []), header.get("token_hashes", [])
            if len(ids) != shard["examples"]:
                raise StoreError(
                    f"teacher store {self.path}: shard {shard['file']} lists {len(ids)} examples, "
                    f"manifest says {shard['examples']}"
                )
            for local, (example_id, token_hash) in enumerate(zip(ids, hashes)):
                self.index[example_id] = (shard_idx, local)
                self.token_hashes[example_id] = token_hash

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.spec.vocab_size)

    @property
    def num_rows(self) -> int:
        """Label positions stored (one row of k entries each)."""
        return int(self.manifest["total_rows"])

    @property
    def nbytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum((self.path / shard["file"]).stat().st_size for shard in self.manifest["shards"])

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.index

    def _open(self, shard_idx: int) -> codec.Shard:
        if shard_idx not in self._shards:
            shard = self.manifest["shards"][shard_idx]
            file = self.path / shard["file"]
            if self.verify and shard_idx not in self._verified:
                if sha256_file(file) != shard["sha256"]:
                    raise StoreError(f"teacher store {self.path}: checksum mismatch in shard {shard['file']}")
                self._verified.add(shard_idx)
            self._shards[shard_idx] = codec.open_shard(self.spec, safe_open(str(file), framework="np"))
        return self._shards[shard_idx]

    def verify_all(self) -> None:
        """Check every shard's checksum now (instead of on first read)."""
        for shard_idx in range(len(self.manifest["shards"])):
            self._open(shard_idx)

    def encoded_rows(self, example_id: str) -> codec.EncodedRows:
        """The still-encoded rows of one example (sliced from the memory-mapped shard)."""
        if example_id not in self.index:
            raise StoreError(f"teacher store {self.path} has no example {example_id!r}")
        shard_idx, local = self.index[example_id]
        return self._open(shard_idx).rows(local)

    def get(self, example_id: str) -> TeacherRows:
        """The teacher rows of one example."""
        return TeacherRows(*codec.decode(self.spec, [self.encoded_rows(example_id)]))

    def get_many(self, example_ids: list[str]) -> tuple[TeacherRows, list[int]]:
        """The rows of several examples, concatenated in order, and each one's row count."""
        parts = [self.encoded_rows(example_id) for example_id in example_ids]
        return TeacherRows(*codec.decode(self.spec, parts)), [p.rows for p in parts]

    def check_compatible(self, tokenizer: PreTrainedTokenizerBase, examples: list[EncodedExample]) -> None:
        """Refuse a store made with another tokenizer, or on other token sequences than ``examples``."""
        saved, mine = self.manifest["tokenizer"], tokenizer_fingerprint(tokenizer)
        problems = []
        if saved["vocab_size"] != mine["vocab_size"]:
            problems.append(f"vocab size {saved['vocab_size']} (store) != {mine['vocab_size']} (student tokenizer)")
        elif saved["vocab_sha256"] != mine["vocab_sha256"]:
            problems.append("the vocabularies differ (same size, different tokens or ids)")
        if saved["chat_template_sha256"] != mine["chat_template_sha256"]:
            problems.append("the chat templates differ")
        if not problems and saved["sha256"] != mine["sha256"]:
            problems.append("the special tokens differ")
        if problems:
            raise StoreError(f"teacher store {self.path} does not match the student's tokenizer: {'; '.join(problems)}")
        missing = [e.id for e in examples if e.id not in self.index]
        if missing:
            raise StoreError(
                f"teacher store {self.path} lacks {len(missing)} of the dataset's {len(examples)} examples "
                f"(e.g. {missing[:3]}): it was scored on other data"
            )
        changed = [e.id for e in examples if self.token_hashes[e.id] != example_token_hash(e)]
        if changed:
            raise StoreError(
                f"teacher store {self.path}: {len(changed)} examples were tokenized differently when scored "
                f"(e.g. {changed[:3]}): the data, its response style or max_length changed"
            )


class StoreUnion:
    """Several stores read as one (e.g. label-conditioned and on-policy signals of one KD stage).

    Every example id is looked up in the store that holds it; rows come back in the order asked for. The
    stores must share their codec (same vocabulary and k), so their rows decode into one batch.
    """

    def __init__(self, stores: list[TeacherStore]) -> None:
        if not stores:
            raise StoreError("a store union needs at least one store")
        first = stores[0]
        for store in stores[1:]:
            if (store.spec.k, store.spec.vocab_size) != (first.spec.k, first.spec.vocab_size):
                raise StoreError(
                    f"teacher stores {first.path} and {store.path} hold different signals "
                    f"(k={first.k} vs k={store.k}, or another vocabulary): they cannot be mixed in one batch"
                )
            if store.temperature != first.temperature:
                raise StoreError(
                    f"teacher stores {first.path} (T={first.temperature}) and {store.path} (T={store.temperature}) "
                    "were scored at different temperatures: they cannot be mixed in one batch"
                )
        self.stores = list(stores)

    @property
    def temperature(self) -> float:
        return self.stores[0].temperature

    @property
    def vocab_size(self) -> int:
        return self.stores[0].vocab_size

    @property
    def k(self) -> int:
        return self.stores[0].k

    def _owner(self, example_id: str) -> TeacherStore:
        for store in self.stores:
            if example_id in store:
                return store
        raise StoreError(f"no teacher store of {[str(s.path) for s in self.stores]} has example {example_id!r}")

    def __contains__(self, example_id: str) -> bool:
        return any(example_id in store for store in self.stores)

    def get(self, example_id: str) -> TeacherRows:
        return self._owner(example_id).get(example_id)

    def get_many(self, example_ids: list[str]) -> tuple[TeacherRows, list[int]]:
        # consecutive examples of one store decode together (stores may differ in codec, e.g. v1 and v2)
        runs: list[tuple[TeacherStore, list[codec.EncodedRows]]] = []
        for example_id in example_ids:
            store = self._owner(example_id)
            if not runs or runs[-1][0] is not store:
                runs.append((store, []))
            runs[-1][1].append(store.encoded_rows(example_id))
        decoded = [codec.decode(store.spec, parts) for store, parts in runs]
        counts = [p.rows for _, parts in runs for p in parts]
        if not decoded:
            return TeacherRows(*codec.decode(self.stores[0].spec, [])), counts
        return TeacherRows(*(torch.cat([d[i] for d in decoded]) for i in range(4))), counts
