"""File and dataset sources: record formats, validation with locations, error policy, overlong examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from kdpipe.data.datamodule import PostTrainDataModule, encode_examples
from kdpipe.data.encode import encode_example, prompt_messages, reference_reply, to_messages
from kdpipe.data.records import DataError
from kdpipe.data.scorers import example_scores
from kdpipe.data.sources import load_examples, load_split
from kdpipe.types import IGNORE_INDEX
from tests.helpers import REPO, compose_cfg

CHAT = {
    "id": "c1",
    "difficulty": 2,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 5+7?"},
        {"role": "assistant", "content": "5+7=12."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12*3=36."},
    ],
}
VARIANTS = {
    "id": "p1",
    "prompt": "2+2?",
    "response": {"reasoning": "2+2=4\nAnswer: 4", "fast": "Answer: 4"},
    "difficulty": 1,
    "answer": 4,
}
SINGLE = {"prompt": "Capital of Japan?", "response": "Tokyo.", "difficulty": 3.5}


def write_jsonl(path: Path, records: list) -> Path:
    """One line per record: dicts as JSON, strings written verbatim (to plant broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def data_cfg(source: str = "jsonl", **extra) -> DictConfig:
    return OmegaConf.create({"source": source, "styles": ["reasoning", "fast"], **extra})


def jsonl_cfg(tmp_path: Path, records: list, **extra) -> DictConfig:
    return data_cfg(files={"train": str(write_jsonl(tmp_path / "train.jsonl", records))}, **extra)


# --- formats ----------------------------------------------------------------------------------------


def test_jsonl_both_formats_become_example_dicts(tmp_path):
    examples = load_examples(jsonl_cfg(tmp_path, [CHAT, VARIANTS, SINGLE]), "train")
    chat, variants, single = examples
    assert chat == {"id": "c1", "messages": CHAT["messages"], "level": 2}
    assert variants == {
        "id": "p1",
        "prompt": "2+2?",
        "responses": VARIANTS["response"],
        "level": 1,
        "answer": "4",
    }
    assert single["responses"] == {"reasoning": "Tokyo.", "fast": "Tokyo."}  # one response serves every style
    assert single["level"] == 3.5 and "answer" not in single
    assert single["id"].startswith("jsonl-") and len(single["id"]) == len("jsonl-") + 12
    # the hashed id is stable, and follows the content, not the position
    again = load_examples(jsonl_cfg(tmp_path, [SINGLE, CHAT]), "train")
    assert again[0]["id"] == single["id"]


def test_parquet_with_flat_response_columns_and_renamed_fields(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [
        {"q": "2+2?", "long": "2+2=4\nAnswer: 4", "short": "Answer: 4", "hardness": 1},
        {"q": "3+3?", "long": "3+3=6\nAnswer: 6", "short": None, "hardness": 2},
        {"q": "4+4?", "long": None, "short": None, "hardness": 2},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    fields = {"prompt": "q", "response": {"reasoning": "long", "fast": "short"}, "difficulty": "hardness"}
    cfg = data_cfg("parquet", files={"train": str(path)}, fields=fields, on_error="skip")
    loaded = load_split(cfg, "train")
    assert [e["prompt"] for e in loaded.examples] == ["2+2?", "3+3?", "4+4?"]
    assert loaded.examples[0]["responses"] == {"reasoning": rows[0]["long"], "fast": rows[0]["short"]}
    assert loaded.examples[1]["responses"] == {"reasoning": rows[1]["long"]}  # a null column: no such variant
    assert loaded.skipped_invalid == 0  # every response column empty: a prompt only, valid for rollouts
    assert loaded.unlabelled == ((loaded.examples[2]["id"], f"{path} row 2"),)


def test_hf_disk_per_split_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([VARIANTS, {**VARIANTS, "id": "p2"}]).save_to_disk(str(tmp_path / "train"))
    cfg = data_cfg("hf_disk", files={"train": str(tmp_path / "train")})
    assert [e["id"] for e in load_examples(cfg, "train")] == ["p1", "p2"]

    bad = {"prompt": "x", "response": "", "id": "p3"}
    dd = datasets.DatasetDict(
        {"train_sft": datasets.Dataset.from_list([CHAT]), "test_sft": datasets.Dataset.from_list([bad])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = data_cfg("hf_disk", path=str(tmp_path / "dd"), splits={"train": "train_sft", "test": "test_sft"})
    assert load_examples(cfg, "train")[0]["messages"] == CHAT["messages"]
    with pytest.raises(DataError, match=r"dd\[test_sft\] row 0: 'response' is empty"):
        load_examples(cfg, "test")
    with pytest.raises(KeyError, match="no split 'val'"):
        load_examples(cfg, "val")


def test_hf_hub_through_the_json_builder_on_a_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "all.jsonl", [VARIANTS, CHAT])
    kwargs = {"data_files": {"everything": str(path)}, "cache_dir": str(tmp_path / "cache")}
    cfg = data_cfg("hf_hub", path="json", splits={"train": "everything"}, load_kwargs=kwargs)
    examples = load_examples(cfg, "train")
    assert [e["id"] for e in examples] == ["p1", "c1"]
    assert examples[1]["messages"] == CHAT["messages"]


# --- validation ---------------------------------------------------------------------------------------

BAD_RECORDS = [
    ('{"prompt": "x", "response": ', "invalid JSON"),
    ("[1, 2]", "expected an object, got list"),
    ({"response": "y"}, "missing field: a record needs 'messages' or 'prompt'"),
    ({"prompt": "x", "response": 3}, "'response' must be a string or an object of style variants"),
    ({"prompt": "x", "response": {"fsat": "y"}}, "unknown style 'fsat'"),
    ({"prompt": "  ", "response": "y"}, "'prompt' is empty"),
    ({"prompt": "x", "response": "y", "messages": CHAT["messages"]}, "has both 'messages' and 'prompt'"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "y"}]}, "messages[0]: unknown role 'bot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}, "content is empty"),
    ({"messages": [{"role": "system", "content": "x"}]}, "must end with an assistant turn"),
    ({"prompt": "x", "response": {}}, "'response' has no variant set"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, CHAT["messages"][2]]},
        "messages[1]: a system turn may only come first",
    ),
    ({"prompt": "x", "response": "y", "difficulty": "hard"}, "'difficulty' must be a number, got str 'hard'"),
    ({"prompt": "x", "response": "y", "difficulty": True}, "'difficulty' must be a number"),
    ({"prompt": "x", "response": "y", "id": ["a"]}, "'id' must be a string or an integer"),
    ({"prompt": "x", "response": "y", "answer": {"a": 1}}, "'answer' must be a string or a number"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_every_bad_record_is_reported_with_its_line(tmp_path, record, message):
    cfg = jsonl_cfg(tmp_path, [VARIANTS, "", record])  # a blank line is skipped but still counts
    with pytest.raises(DataError) as err:
        load_examples(cfg, "train")
    assert len(err.value.problems) == 1
    problem = err.value.problems[0]
    assert problem.where == f"{tmp_path / 'train.jsonl'}:3"
    assert message in problem.message
    assert f"{tmp_path / 'train.jsonl'}:3:" in str(err.value)  # invalid JSON: file:line:column


def test_fail_lists_the_first_problems_and_the_total(tmp_path):
    cfg = jsonl_cfg(tmp_path, [VARIANTS] + [{"prompt": f"q{i}", "response": 3} for i in range(15)])
    with pytest.raises(ValueError, match="15 invalid record") as err:
        load_examples(cfg, "train")
    text = str(err.value)
    assert "data.files.train" in text and "data.on_error=skip" in text
    assert "train.jsonl:2: 'response' must be a string" in text and "train.jsonl:11:" in text
    assert "train.jsonl:12:" not in text and "... and 5 more" in text
    assert err.value.total == 15


def test_skip_drops_bad_records_counts_and_warns(tmp_path, caplog):
    cfg = jsonl_cfg(tmp_path, [VARIANTS, "{nope", {"prompt": "x", "response": 3}, SINGLE], on_error="skip")
    with caplog.at_level(logging.WARNING, logger="kdpipe.data.records"):
        loaded = load_split(cfg, "train")
    assert [e["prompt"] for e in loaded.examples] == ["2+2?", "Capital of Japan?"]
    assert loaded.skipped_invalid == 2
    assert "skipped 2 invalid record(s)" in caplog.text and "train.jsonl:2:2: invalid JSON" in caplog.text


def test_nothing_valid_fails_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="no valid records"):
        load_examples(jsonl_cfg(tmp_path, [{"prompt": "x", "response": 3}], on_error="skip"), "train")
    with pytest.raises(DataError, match="no records"):
        load_examples(jsonl_cfg(tmp_path, [""]), "train")


PROMPT_ONLY = [
    {"id": "p", "prompt": "3+4?", "answer": 7},  # no response field
    {"id": "n", "prompt": "5+1?", "response": None},  # a null response
    {"id": "c", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "9-2?"}]},
    {"id": "m", "messages": [*CHAT["messages"], {"role": "user", "content": "And plus 1?"}]},  # the next reply
]


def test_prompt_only_records_load_marked_unlabelled_with_where_they_are(tmp_path):
    cfg = jsonl_cfg(tmp_path, [VARIANTS, *PROMPT_ONLY])
    loaded = load_split(cfg, "train")
    path = tmp_path / "train.jsonl"
    assert [e["id"] for e in loaded.examples] == ["p1", "p", "n", "c", "m"] and not loaded.problems
    assert loaded.unlabelled == tuple((r["id"], f"{path}:{i}") for i, r in enumerate(PROMPT_ONLY, 2))
    labelled, plain, null, chat, multi = loaded.examples
    assert "unlabelled" not in labelled and all(e["unlabelled"] is True for e in (plain, null, chat, multi))
    assert "responses" not in plain and plain["answer"] == "7" and reference_reply(plain, "fast") is None
    assert reference_reply(multi, "fast") is None  # its last assistant turn answers another question
    # what a model is asked: the whole conversation; there is nothing to learn
    assert prompt_messages(chat) == chat["messages"] and prompt_messages(multi)[-1]["content"] == "And plus 1?"
    with pytest.raises(KeyError, match="prompt-only record"):
        to_messages(plain, "fast")


def test_flat_response_columns_all_empty_make_a_prompt_only_record(tmp_path):
    fields = {"response": {"reasoning": "long", "fast": "short"}}
    records = [{"prompt": "a", "long": "x", "short": None}, {"prompt": "b", "long": None, "short": None}]
    labelled, prompt = load_examples(jsonl_cfg(tmp_path, records, fields=fields), "train")
    assert labelled["responses"] == {"reasoning": "x"} and prompt["unlabelled"] and "responses" not in prompt


def test_duplicate_ids_explicit_or_hashed(tmp_path):
    records = [VARIANTS, SINGLE, {**VARIANTS, "prompt": "other"}, SINGLE]
    with pytest.raises(DataError) as err:
        load_examples(jsonl_cfg(tmp_path, records), "train")
    path = tmp_path / "train.jsonl"
    assert str(err.value.problems[0]) == f"{path}:3: duplicate id 'p1' (first at {path}:1)"
    assert "duplicate id 'jsonl-" in err.value.problems[1].message and err.value.problems[1].where.endswith(":4")
    loaded = load_split(jsonl_cfg(tmp_path, records, on_error="skip"), "train")
    assert len(loaded.examples) == 2 and loaded.skipped_invalid == 2
    assert loaded.examples[0]["prompt"] == "2+2?"  # the first one is kept


def test_missing_file_names_the_key_and_the_path(tmp_path):
    cfg = data_cfg(files={"train": str(tmp_path / "nope.jsonl")})
    with pytest.raises(FileNotFoundError, match=r"data\.files\.train: .*nope\.jsonl"):
        load_examples(cfg, "train")
    with pytest.raises(KeyError, match=r"data\.files has no 'val' entry"):
        load_examples(cfg, "val")


def test_configurable_field_and_role_names(tmp_path):
    sharegpt = {
        "uid": 7,
        "level": 4,
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    }
    fields = {"messages": "conversations", "role": "from", "content": "value", "id": "uid", "difficulty": "level"}
    cfg = jsonl_cfg(tmp_path, [sharegpt], fields=fields, roles={"human": "user", "gpt": "assistant"})
    assert load_examples(cfg, "train") == [
        {
            "id": "7",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "level": 4,
        }
    ]
    with pytest.raises(ValueError, match=r"data\.fields\.question: unknown field"):
        load_examples(jsonl_cfg(tmp_path, [sharegpt], fields={"question": "q"}), "train")


def test_a_changed_file_is_read_again(tmp_path):
    cfg = jsonl_cfg(tmp_path, [VARIANTS])
    assert len(load_examples(cfg, "train")) == 1
    write_jsonl(tmp_path / "train.jsonl", [VARIANTS, SINGLE])
    assert len(load_examples(cfg, "train")) == 2


# --- encoding -----------------------------------------------------------------------------------------


def test_multi_turn_labels_are_exactly_the_assistant_turns(tokenizer, tmp_path):
    (example,) = load_examples(jsonl_cfg(tmp_path, [CHAT]), "train")
    enc = encode_example(tokenizer, example, "fast", system_prompt="ignored for chat records")
    runs, current = [], []
    for t, label in enumerate(enc.labels):
        if label != IGNORE_INDEX:
            assert label == enc.input_ids[t + 1]
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    assert [tokenizer.decode(r) for r in runs] == ["5+7=12.<|im_end|>", "12*3=36.<|im_end|>"]
    # the user and system turns (and the unused style system prompt) are never targets
    assert "ignored" not in tokenizer.decode(enc.input_ids)
    targets = {t for t, label in enumerate(enc.labels) if label != IGNORE_INDEX}
    for turn in ("Be brief.", "What is 5+7?", "And times 3?"):
        span = tokenizer(turn, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(enc.input_ids)) if enc.input_ids[i : i + len(span)] == span)
        assert not targets & set(range(start - 1, start + len(span) - 1))  # the positions predicting the turn


def test_a_style_response_of_a_chat_example_answers_its_last_prompt():
    rollout = {"id": "c1#s0", "messages": CHAT["messages"], "responses": {"reasoning": "36"}}
    assert to_messages(rollout, "reasoning") == [*CHAT["messages"][:4], {"role": "assistant", "content": "36"}]
    assert to_messages(rollout, "fast") == CHAT["messages"]


def test_difficulty_feeds_the_level_scorer(tokenizer, tmp_path):
    examples = load_examples(jsonl_cfg(tmp_path, [CHAT, VARIANTS, SINGLE]), "train")
    encoded, _ = encode_examples(tokenizer, data_cfg(), examples, ["reasoning"])
    assert example_scores(encoded, {"scorer": "level"}) == [2.0, 1.0, 3.5]
    unscored = load_examples(jsonl_cfg(tmp_path, [{"prompt": "x", "response": "y"}]), "train")
    encoded, _ = encode_examples(tokenizer, data_cfg(), unscored, ["reasoning"])
    with pytest.raises(ValueError, match="examples have no level"):
        example_scores(encoded, {"scorer": "level"})


def test_overlong_drop_or_truncate(tokenizer):
    short = {"id": "s", "prompt": "1+1?", "responses": {"reasoning": "2"}}
    long = {"id": "l", "prompt": "1+1?", "responses": {"reasoning": "one plus one is two. " * 5}}
    long_prompt = {"id": "p", "prompt": "x" * 60, "responses": {"reasoning": "y"}}
    examples = [short, long, long_prompt]
    n_short = len(encode_example(tokenizer, short, "reasoning").input_ids)
    max_length = n_short + 5

    kept, dropped = encode_examples(tokenizer, data_cfg(max_length=max_length), examples, ["reasoning"])
    assert [e.id for e in kept] == ["s"] and dropped == 2

    cfg = data_cfg(max_length=max_length, overlong="truncate")
    kept, dropped = encode_examples(tokenizer, cfg, examples, ["reasoning"])
    assert [e.id for e in kept] == ["s", "l"] and dropped == 1  # the long prompt leaves no label token
    cut = kept[1]
    assert cut.truncated and not kept[0].truncated
    full = encode_example(tokenizer, long, "reasoning")
    assert cut.input_ids == full.input_ids[:max_length] and len(cut.labels) == max_length
    assert cut.labels[:-1] == full.labels[: max_length - 1] and cut.labels[-1] == IGNORE_INDEX
    assert cut.num_label_tokens > 0
    with pytest.raises(ValueError, match="overlong='cut'"):
        encode_examples(tokenizer, data_cfg(max_length=8, overlong="cut"), examples, ["reasoning"])


# --- configs and the DataModule -------------------------------------------------------------------------


def test_the_committed_sample_loads_with_the_config_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = compose_cfg(["data=jsonl_chat"]).data
    loaded = load_split(cfg, "train")
    assert len(loaded.examples) >= 30 and loaded.skipped_invalid == 0
    assert any(len(e.get("messages", [])) > 2 for e in loaded.examples)  # multi-turn
    assert any(len(set(e.get("responses", {}).values())) == 2 for e in loaded.examples)  # style variants
    assert all(e.get("level") is not None for e in loaded.examples)
    assert compose_cfg(["data=hf_dataset"]).data.source == "hf_disk"


def test_datamodule_end_to_end_on_jsonl_config(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [CHAT, VARIANTS, SINGLE, "{broken", {**SINGLE, "prompt": "z" * 200}])
    val = write_jsonl(tmp_path / "val.jsonl", [{**VARIANTS, "id": "v1"}, {**CHAT, "id": "v2"}])
    cfg = compose_cfg(
        [
            "data=jsonl_chat",
            "curriculum=sorted",
            f"data.files.train={train}",
            f"data.files.val={val}",
            "data.on_error=skip",
            "data.max_length=120",
        ]
    )
    dm = PostTrainDataModule(
        tokenizer, data=cfg.data, style="fast", curriculum=cfg.curriculum, batch_size=2, num_batches=3, seed=0
    )
    dm.setup("fit")
    assert dm.skipped_invalid == {"train": 1, "val": 0}
    assert dm.dropped["train"] == 1 and dm.truncated["train"] == 0
    assert sorted(e.level for e in dm.datasets["train"]) == [1, 2, 3.5]
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert batches[0]["levels"].tolist() == [1, 2]  # curriculum=sorted: easiest first, by difficulty
    assert next(iter(dm.val_dataloader()))["ids"] == ["v1", "v2"]
