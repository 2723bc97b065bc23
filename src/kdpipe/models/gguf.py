"""GGUF checkpoints: load once through ``transformers``, save as a plain checkpoint, reuse that.

``from_pretrained(dir, gguf_file=...)`` dequantizes the weights but leaves the model flagged as quantized
(``hf_quantizer``, ``config.quantization_config``), and such a model can be neither trained nor
``save_pretrained``. :func:`converted_dir` therefore rebuilds the model from its config without the
quantization settings, copies the dequantized weights in, and saves model and tokenizer into
``<cache_root>/<gguf stem>-<hash>/`` (written to a temp folder, then renamed into place). The hash is over the
GGUF file's bytes, so a replaced file is converted again and an unchanged one never is.
"""

from __future__ import annotations

import functools
from pathlib import Path

from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kdpipe.utils.io import atomic_dir, sha256_file

console = Console()


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes; cached per (path, size, mtime) within the process."""
    return sha256_file(path)


def gguf_path(model_dir: str | Path, gguf_file: str) -> Path:
    """The GGUF file inside ``model_dir``; raises ``FileNotFoundError`` naming both when it is missing."""
    path = Path(model_dir) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {model_dir}")
    return path


def cache_dir_for(model_dir: str | Path, gguf_file: str, cache_root: str | Path) -> Path:
    """Where the plain checkpoint converted from this GGUF file lives (whether or not it exists yet)."""
    path = gguf_path(model_dir, gguf_file)
    stat = path.stat()
    key = _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:12]
    return Path(cache_root).expanduser().resolve() / f"{path.stem}-{key}"


def load_gguf_tokenizer(model_dir: str | Path, gguf_file: str, trust_remote_code: bool = False):
    """The tokenizer stored in a GGUF file."""
    return AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def _save_converted(model_dir: Path, gguf_file: str, tokenizer: PreTrainedTokenizerBase, out: Path, trust: bool):
    """Dequantize through ``transformers``, rebuild unflagged, ``save_pretrained`` model and tokenizer."""
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_file, trust_remote_code=trust)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def converted_dir(
    model_dir: str | Path, gguf_file: str, cache_root: str | Path, trust_remote_code: bool = False
) -> Path:
    """A plain ``save_pretrained`` checkpoint of a GGUF model, converting it on first use."""
    model_dir = Path(model_dir)
    final = cache_dir_for(model_dir, gguf_file, cache_root)
    if (final / "config.json").exists():
        return final
    console.print(f"converting {model_dir / gguf_file} into a plain checkpoint at {final} (once)")
    tokenizer = load_gguf_tokenizer(model_dir, gguf_file, trust_remote_code)
    with atomic_dir(final, replace=False) as tmp:  # another process converting it too: theirs is the same
        _save_converted(model_dir, gguf_file, tokenizer, tmp, trust_remote_code)
    return final
