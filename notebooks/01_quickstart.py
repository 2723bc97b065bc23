# ---
# jupyter:
#   # ruff: noqa: E402
#   # (this script only: its imports follow the parameters and warnings cells; in the .ipynb, ruff checks
#   # E402 per cell, and jupytext leaves this YAML comment out of it)
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # kdpipe quickstart: curriculum data, a teacher store, distillation
#
# This notebook uses `kdpipe` as a library (no `kdpipe-train`): it builds the tokenizer and the
# curriculum `PostTrainDataModule` on the built-in arithmetic task, trains a small teacher with
# `SFTModule`, scores it into a teacher store (top-k log-probs at every label position), looks inside
# that store, distils a smaller student from it with `KDModule`, plots the KD diagnostics the module
# logs, and evaluates both models by generation.
#
# Everything is generated locally (no download). With the default sizes it runs in a few minutes on a
# laptop CPU; set `TINY = True` below for a smoke run in seconds (that is what
# `tests/integration/test_notebook.py` executes). Outputs go to `OUT_DIR` under the directory the kernel
# runs in.
#
# *The source of this notebook is the jupytext script `notebooks/01_quickstart.py`: edit that file, then
# run `make notebooks` to rebuild this `.ipynb` (committed without outputs).*

# %% tags=["parameters"]
# Parameters: every size in this notebook comes from this cell (a test overrides it to run TINY).
TINY = False  # True: tiny models, data and step counts (seconds, for smoke tests)
THREADS = 0  # torch intra-op threads (0: torch's default)
OUT_DIR = "quickstart_out"  # logs, the teacher store and plots (relative to the working directory)
SEED = 0

FULL = dict(
    teacher="arith_teacher",  # configs/model/arith_teacher.yaml: Llama-style, ~1.9M parameters
    student="arith_student",  # configs/model/arith_student.yaml: ~0.24M parameters
    levels=[1, 2, 3, 4, 5],  # difficulty levels of the built-in task (4 and 5 add * and precedence)
    n_train_per_level=3000,  # (level 1 has only ~80 distinct problems in all)
    n_val_per_level=20,
    n_test_per_level=50,
    teacher_steps=1100,  # as the default pipeline's teacher_sft: it needs them to get good at this
    student_steps=800,
    batch_size=64,
    k=16,  # top-k entries stored per label position
    max_new_tokens=64,  # generation limit at evaluation
    precision="bf16-mixed",  # use "32-true" on CPUs without bf16 support (or if this is slow)
    log_every=10,
)
SMALL = dict(
    teacher="arith_tiny",
    student="arith_tiny",
    levels=[1, 2, 3],
    n_train_per_level=12,
    n_val_per_level=2,
    n_test_per_level=2,
    teacher_steps=3,
    student_steps=4,
    batch_size=8,
    k=8,
    max_new_tokens=12,
    precision="32-true",
    log_every=1,
)

# %%
import warnings

# tqdm's notice that ipywidgets is missing (progress bars are off here anyway)
warnings.filterwarnings("ignore", message="IProgress not found")

# %%
import csv
import json
import time
from pathlib import Path

import hydra
import lightning as L
import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from kdpipe.data.datamodule import PostTrainDataModule
from kdpipe.data.encode import system_prompt_for
from kdpipe.data.sources import load_examples
from kdpipe.engines import score_teacher
from kdpipe.eval import build_metric, evaluate_model
from kdpipe.models.factory import build_model, count_parameters
from kdpipe.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from kdpipe.models.tokenizer import build_char_tokenizer
from kdpipe.modules import KDModule, SFTModule
from kdpipe.store.reader import TeacherStore
from kdpipe.types import IGNORE_INDEX
from kdpipe.utils.paths import config_dir
from kdpipe.utils.quiet import quiet_third_party

S = SMALL if TINY else FULL
if THREADS:
    torch.set_num_threads(THREADS)
quiet_third_party()  # hide transformers' and Lightning's start-up chatter
out = Path(OUT_DIR).resolve()
out.mkdir(parents=True, exist_ok=True)
print(f"{'TINY' if TINY else 'full'} run, {torch.get_num_threads()} torch threads, outputs in {out}")

# %% [markdown]
# ## 1. Configs, tokenizer and the curriculum DataModule
#
# The configs are the ones `kdpipe-train` composes (`configs/`), composed here with Hydra's compose API
# and the same override syntax as the command line. We take what we need from the result: the `data`
# group (the built-in task), the `curriculum` group (here *competence* pacing with the `level` scorer:
# batch *t* is drawn from the easiest *c(t)* share of the data), the two model configs, the optimizer
# and schedule, and the KD loss settings of a `kd` stage: every named stage of the pipeline is composed
# from the defaults of its kind (`configs/stage/<kind>.yaml`), and the default pipeline's `kd_fast` keeps
# the `kd` defaults of `configs/stage/kd.yaml`.

# %%
overrides = [
    "curriculum=competence",
    f"model@models.teacher={S['teacher']}",
    f"model@models.student={S['student']}",
    f"data.levels=[{','.join(map(str, S['levels']))}]",
    f"data.n_train_per_level={S['n_train_per_level']}",
    f"data.n_val_per_level={S['n_val_per_level']}",
    f"data.n_test_per_level={S['n_test_per_level']}",
]
with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
    cfg = compose("train", overrides=overrides)

print(OmegaConf.to_yaml(cfg.data))
print(OmegaConf.to_yaml(cfg.curriculum))
print(OmegaConf.to_yaml(cfg.pipeline.stages.kd_fast.loss))

# %% [markdown]
# The tokenizer is kdpipe's built-in character-level `PreTrainedTokenizerFast` with a ChatML-style chat
# template. The DataModule tokenizes every example with it (labels on the assistant tokens only, already
# shifted: `labels[t]` is the token to predict at position `t`), scores each example's difficulty and
# serves the curriculum's batch plan. `num_batches` is the length of that plan: the number of training
# steps. This DataModule has the student's settings, so the plan shown below is the one the student
# trains on in section 4.

# %%
tokenizer = build_char_tokenizer()
STYLE = "reasoning"  # step-by-step responses; "fast" is the answer alone, asked for by a system prompt

datamodule = PostTrainDataModule(
    tokenizer,
    data=cfg.data,
    style=STYLE,
    curriculum=cfg.curriculum,
    batch_size=S["batch_size"],
    num_batches=S["student_steps"],
    seed=SEED,
)
datamodule.setup("fit")
train_examples = datamodule.encode_split("train")
print(f"vocabulary: {len(tokenizer)} tokens")
print(f"train: {len(train_examples)} examples, val: {len(datamodule.encode_split('val'))}")
print("dropped (longer than data.max_length):", datamodule.dropped)

batch = next(iter(datamodule.train_dataloader()))
print({k: tuple(v.shape) if torch.is_tensor(v) else f"list[{len(v)}]" for k, v in batch.items()})

# %% [markdown]
# One row of that batch, decoded: the prompt carries no labels (`-100`), the response does. The image
# shows the label mask of the whole batch (rows: examples, columns: positions; right padding is dark).

# %%
row = 0
ids, labels, attention = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
n = int(attention.sum())
first_label = int((labels != IGNORE_INDEX).nonzero()[0])
print(f"id {batch['ids'][row]}, level {int(batch['levels'][row])}, {n} tokens")
print("--- prompt (no labels) ---")
print(tokenizer.decode(ids[: first_label + 1]))
print("--- response (the labels) ---")
print(tokenizer.decode(labels[labels != IGNORE_INDEX]))

label_mask = (batch["labels"] != IGNORE_INDEX).int() + batch["attention_mask"]  # 0 pad, 1 prompt, 2 label
fig, ax = plt.subplots(figsize=(9, 2.2))
ax.imshow(label_mask, aspect="auto", interpolation="nearest", cmap="viridis")
ax.set(xlabel="position", ylabel="example", title="label mask (yellow: labelled, teal: prompt, dark: pad)")
plt.show()

# %% [markdown]
# The curriculum's plan over the whole stage: competence pacing starts on the easiest examples and
# brings in harder levels as training goes on (the plan is a pure function of the seed and the data).

# %%
plan = datamodule.make_sampler().global_plan
mean_level = [sum(train_examples[i].level for i in b) / len(b) for b in plan]
print("levels of the first batch:", sorted(train_examples[i].level for i in plan[0]))
print("levels of the last batch: ", sorted(train_examples[i].level for i in plan[-1]))

fig, ax = plt.subplots(figsize=(6, 2.5))
ax.plot(mean_level)
ax.set(xlabel="batch (training step)", ylabel="mean level", title=f"curriculum: {cfg.curriculum.schedule}")
plt.show()

# %% [markdown]
# ## 2. Train the teacher with `SFTModule`
#
# Models come from `configs/model/*.yaml` through `build_model` (a `transformers` Llama built from its
# config; vocabulary and special ids come from the tokenizer). As in the default pipeline, the teacher
# sees a plain shuffle (`schedule: random`): the curriculum is for the student.
#
# Every training run below uses the same small Lightning `Trainer` helper: exactly `max_steps` batches
# (the curriculum plan is one long "epoch"), gradient clipping, validation loss once at the end, and a
# `CSVLogger` whose `metrics.csv` we read back for the plots.


# %%
def make_trainer(name: str, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        precision=S["precision"],
        max_steps=max_steps,
        max_epochs=1,
        gradient_clip_val=1.0,
        val_check_interval=max_steps,  # validation loss once, at the end
        num_sanity_val_steps=0,
        log_every_n_steps=S["log_every"],
        logger=CSVLogger(out, name=name),  # a new version_N folder per run
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the curriculum sampler already plans the batches
        **kwargs,
    )


def optimizer_parts() -> dict:
    # partial AdamW and warmup-cosine schedule from the composed optimizer/scheduler groups
    return dict(
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
        weight_decay=0.01,
    )


L.seed_everything(SEED, verbose=False)
teacher = build_model(cfg.models.teacher, tokenizer)
teacher_data = PostTrainDataModule(
    tokenizer,
    data=cfg.data,
    style=STYLE,
    curriculum=OmegaConf.create({"schedule": "random"}),
    batch_size=S["batch_size"],
    num_batches=S["teacher_steps"],
    seed=SEED,
)
teacher_module = SFTModule(teacher, **optimizer_parts())
trainer = make_trainer("teacher_sft", S["teacher_steps"])
started = time.perf_counter()
trainer.fit(teacher_module, datamodule=teacher_data)
print(
    f"teacher: {count_parameters(teacher):,} parameters, {trainer.global_step} steps "
    f"in {time.perf_counter() - started:.0f} s, val/loss {float(trainer.callback_metrics['val/loss']):.4f}"
)

# %% [markdown]
# ## 3. Score the teacher into a store
#
# The teacher runs once over the training sequences (teacher forcing) and its top-k log-probs, the log
# of the remaining tail mass and the label's log-prob are written, compressed, at every label position.
# `kdpipe.engines.score_teacher` does this, exactly as a `score` stage of the pipeline and `kdpipe-score`
# do: `TeacherScorer` under `Trainer.predict`, streaming each batch into the store's shards, then one
# manifest over them. The store's name hashes what determines its content (the teacher's weights and
# config, the tokenizer, the exact token sequences, `k` and the temperature), so the path below is keyed
# by them and a re-run with the same teacher reuses the store.
#
# We score exactly the examples the student's DataModule serves (`datamodule.encode_split("train")`), so
# the store joins them later.

# %%
K, TEMPERATURE = S["k"], 1.0
started = time.perf_counter()
store_path = score_teacher(
    teacher,
    tokenizer,
    train_examples,
    style=STYLE,
    split="train",
    store_root=out / "stores",
    k=K,
    temperature=TEMPERATURE,
    precision="32-true",  # the stored signal is worth full precision
    # a lightning.Trainer config: one device, quiet
    trainer={
        "_target_": "lightning.Trainer",
        "accelerator": "auto",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
)
print(f"store: {store_path} ({time.perf_counter() - started:.1f} s)")

# %% [markdown]
# ### Inside the store
#
# `TeacherStore` opens the manifest and the shards' headers (memory-mapped safetensors) and hands out
# one example's rows by id. The manifest records what the store's name hashes: the teacher's and the
# tokenizer's fingerprints (`kdpipe.models.fingerprint`) among them. The codec (`sorted-ans-v2`) sorts each
# position's top-k ids and codes them as gaps, codes each probability on a grid in `sqrt(p)`, and
# entropy-codes both (rANS) with symbol counts fitted per shard, one stream per example; the label's
# log-prob stays float16. On disk, each shard adds per-example offsets, the symbol counts and a header with
# the example ids and token hashes.

# %%
store = TeacherStore(store_path)
manifest = store.manifest
print(json.dumps({k: manifest[k] for k in ("format", "k", "temperature", "num_examples", "total_rows")}))
print("codec:", manifest["codec"])
print("shards:", [(s["file"], s["examples"], s["rows"]) for s in manifest["shards"]])
print("teacher:", manifest["teacher"])
assert manifest["teacher"] == model_fingerprint(teacher)  # the teacher we trained, these exact weights
assert manifest["tokenizer"] == tokenizer_fingerprint(tokenizer)

nbytes = sum((store_path / s["file"]).stat().st_size for s in manifest["shards"])
rows = manifest["total_rows"]
print(
    f"{nbytes:,} bytes on disk for {rows:,} label positions: {nbytes / rows:.1f} bytes per position, "
    f"{nbytes / (rows * K):.2f} bytes per top-k entry (the full float32 distribution: "
    f"{4 * len(tokenizer)} bytes per position)"
)

# %% [markdown]
# The teacher's top-k at one label position: the one, among the first 200 training examples, where the
# teacher is least sure of its top token (most positions of a trained teacher are near-certain copies).
# The stored probabilities (top-k plus the tail bin) sum to 1.

# %%
least_sure = []  # (top-1 log-prob, example, label index)
for candidate in train_examples[:200]:
    top1 = store.get(candidate.id).topk_logprobs[:, 0]  # rows: one per label position, in order
    least_sure.append((float(top1.min()), candidate, int(top1.argmin())))
_, example, j = min(least_sure, key=lambda c: c[0])

teacher_rows = store.get(example.id)
label_positions = [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
position = label_positions[j]  # the j-th label sits at this token position

print(f"example {example.id}, label position {j} of {len(label_positions)}")
print("context:", repr(tokenizer.decode(example.input_ids[: position + 1])[-60:]))
print("label:  ", repr(tokenizer.decode([example.labels[position]])))
print(f"teacher log-prob of the label: {float(teacher_rows.label_logprob[j]):.4f}\n")
probs = teacher_rows.topk_logprobs[j].exp()
for rank, (token_id, p) in enumerate(zip(teacher_rows.topk_ids[j].tolist(), probs.tolist()), 1):
    mark = "  <- label" if token_id == example.labels[position] else ""
    print(f"{rank:>3}  {tokenizer.decode([token_id])!r:>18}  p={p:.4f}{mark}")
tail = float(teacher_rows.tail_logprob[j].exp())
print(f"tail (every other token): p={tail:.4f}; top-k + tail = {float(probs.sum()) + tail:.4f}")

# %% [markdown]
# ## 4. Distil the student with `KDModule`
#
# The student trains on the curriculum DataModule with the store joined (`store=`): every batch then
# also carries the teacher's top-k ids, log-probs and tail mass at its label positions, and the module's
# loss is `ce_weight * CE + (1 - ce_weight) * divergence(teacher || student)` with the `kd` stage's
# default loss settings (forward KL over the top-k bins plus one tail bin). The DataModule checks the
# store against the tokenizer and the token sequences first.

# %%
L.seed_everything(SEED, verbose=False)
student = build_model(cfg.models.student, tokenizer)
kd_data = PostTrainDataModule(
    tokenizer,
    data=cfg.data,
    style=STYLE,
    curriculum=cfg.curriculum,
    batch_size=S["batch_size"],
    num_batches=S["student_steps"],
    seed=SEED,
    store=store,
)
kd_loss = OmegaConf.to_container(cfg.pipeline.stages.kd_fast.loss, resolve=True)
kd_module = KDModule(student, loss=kd_loss, **optimizer_parts())
trainer = make_trainer("student_kd", S["student_steps"])
started = time.perf_counter()
trainer.fit(kd_module, datamodule=kd_data)
metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
print(
    f"student: {count_parameters(student):,} parameters, {trainer.global_step} steps "
    f"in {time.perf_counter() - started:.0f} s, val/loss {float(trainer.callback_metrics['val/loss']):.4f}"
)
print("logged to", metrics_csv)

# %% [markdown]
# ### KD diagnostics
#
# `KDModule` logs, per step, the loss parts, how much of its probability mass the teacher put in the
# stored top-k (`kd/teacher_topk_mass`), how often the student's argmax is the teacher's
# (`kd/top1_agreement`), and the divergence per difficulty level (`kd/divergence_L<level>`, logged when
# the batch holds that level: with competence pacing the hard levels appear later). With a 104-token
# vocabulary the teacher keeps nearly all of its mass in the top 16, so the tail bin matters little here.


# %%
def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    # metrics.csv has one row per logging step; a metric not logged at that step is empty
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path) as f:
        for record in csv.DictReader(f):
            for name, value in record.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(int(record["step"]))
                    values.append(float(value))
    return series


logged = read_metrics(metrics_csv)
print(sorted(logged))

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name in ("train/ce", "train/divergence"):
    axes[0].plot(*logged[name], label=name)
axes[0].set(title="loss parts", xlabel="step", yscale="log")
for name in ("kd/top1_agreement", "kd/teacher_topk_mass"):
    axes[1].plot(*logged[name], label=name)
axes[1].set(title="agreement with the teacher", xlabel="step")
for name in sorted(n for n in logged if n.startswith("kd/divergence_L")):
    axes[2].plot(*logged[name], marker=".", label=name.removeprefix("kd/divergence_"))
axes[2].set(title=f"{kd_loss['divergence']} divergence per level", xlabel="step", yscale="log")
for ax in axes:
    ax.legend()
fig.tight_layout()
plot_path = out / "kd_diagnostics.png"
fig.savefig(plot_path, dpi=80)
plt.show()
print("saved", plot_path)

# %% [markdown]
# ## 5. Evaluate both models
#
# `evaluate_model` greedy-decodes an answer to every test problem (prompted for the style through the
# chat template) and scores it with a metric: `build_metric("auto", ...)` is, on the built-in task, the
# exact match of the final `Answer: N` (`answer_match(answer_colon)`), overall and per level. It also
# reports the teacher-forced loss on the reference responses of that style.

# %%
test_examples = load_examples(cfg.data, "test")
metric = build_metric("auto", data_cfg=cfg.data)
results = {}
for name, model in (("teacher", teacher), ("student (KD)", student)):
    metrics, records = evaluate_model(
        model,
        tokenizer,
        test_examples,
        metric=metric,
        style=STYLE,
        system_prompt=system_prompt_for(cfg.data, STYLE),
        batch_size=64,
        max_new_tokens=S["max_new_tokens"],
        show_progress=False,
    )
    results[name] = (metrics, records)
    by_level = ", ".join(f"L{k} {v:.0%}" for k, v in metrics["accuracy_by_level"].items())
    print(
        f"{name:>13}: accuracy {metrics['accuracy']:.1%} ({by_level}), loss {metrics['loss']:.4f}, "
        f"{metrics['mean_response_tokens']:.1f} tokens per response, {len(test_examples)} problems"
    )

print("\nthe student's first answers:")
for record in results["student (KD)"][1][:3]:
    verdict = "ok " if record["score"] == 1.0 else "bad"
    print(f"{record['prompt']} = {record['reference_answer']}  {verdict}  {record['reply']!r}")

# %%
levels = list(results["teacher"][0]["accuracy_by_level"])
width = 0.4
fig, ax = plt.subplots(figsize=(6, 3))
for i, (name, (metrics, _)) in enumerate(results.items()):
    xs = [x + (i - 0.5) * width for x in range(len(levels))]
    ax.bar(xs, [metrics["accuracy_by_level"][lv] for lv in levels], width, label=name)
ax.set(xticks=range(len(levels)), xticklabels=[f"L{lv}" for lv in levels], ylim=(0, 1.15), ylabel="accuracy")
ax.set_title("test accuracy per level")
ax.legend(ncol=2, loc="upper right")
plt.show()

# %% [markdown]
# ## Where to go from here
#
# - Compare with a student trained by `SFTModule` on the same DataModule without `store=`: same steps,
#   same curriculum, labels only.
# - Try another divergence or mix (`kd_loss["divergence"] = "jsd"`, `kd_loss["ce_weight"] = 0.0`), another
#   curriculum (`curriculum=baby_steps`, `curriculum/scorer=teacher_nll` with `scorer_store=store`) or the
#   `fast` style (score a store for it first).
# - The same steps as a reproducible, resumable pipeline, with exports and a results table:
#   `kdpipe-train` (see the top-level README), or from Python `train(cfg)` (`from kdpipe.cli.train import
#   train`) on a config composed as above; it returns a `PipelineRun` whose `.results` is the
#   `results.json` payload and `.result("kd_fast")` a stage's typed result.
