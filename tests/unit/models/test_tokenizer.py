"""The built-in tokenizer: round trip, chat template, save/load through AutoTokenizer."""

from __future__ import annotations

import string

from transformers import AutoTokenizer

from kdpipe.models.tokenizer import IM_END, IM_START


def test_round_trip_of_printable_text(tokenizer):
    text = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c") + "\n\nAnswer:  42\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml_with_generation_prompt(tokenizer):
    msgs = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "Answer: 5"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == f"{IM_START}user\n2+3{IM_END}\n{IM_START}assistant\nAnswer: 5{IM_END}\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{IM_START}user\n2+3{IM_END}\n{IM_START}assistant\n"
    assert text.startswith(prompt)


def test_special_tokens_are_single_tokens_and_eos_ends_the_turn(tokenizer):
    for tok in (IM_START, IM_END, "<|pad|>"):
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_saved_tokenizer_loads_with_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "7*8"}, {"role": "assistant", "content": "7*8=56\nAnswer: 56"}]
    assert loaded.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert loaded("9-4 user")["input_ids"] == tokenizer("9-4 user")["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
