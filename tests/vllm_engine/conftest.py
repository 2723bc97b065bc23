"""The vLLM engine's end-to-end tests: collected only where vLLM is installed (``make test-vllm`` builds
.venv-vllm and runs them); the default environment has no vLLM and skips the folder. Its pure parts are
tested everywhere: tests/unit/engines/test_vllm_rows.py."""

import importlib.util
import os

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in the test process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tests' models are small
