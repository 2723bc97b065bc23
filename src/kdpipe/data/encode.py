"""Turn examples into token ids and next-token labels with the tokenizer's chat template.

Labels are stored *already shifted*: ``labels[t]`` is the token the model should predict at position ``t``
(``input_ids[t + 1]`` on an assistant token, ``ignore_index`` elsewhere). Shifting per example, before any
padding or packing, keeps packed rows correct and lets a teacher store align with label positions directly.

Examples longer than ``max_length`` tokens are dropped (``overlong="drop"``) or cut to their first
``max_length`` tokens (``overlong="truncate"``; dropped all the same when no label token survives the cut).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from kdpipe.types import IGNORE_INDEX, EncodedExample

OVERLONG = ("drop", "truncate")


def system_prompt_for(data_cfg, style: str | None) -> str | None:
    """The system message that asks for a response style (``data.system_prompts.<style>``), or None."""
    prompts = data_cfg.get("system_prompts") if data_cfg is not None else None
    return None if not prompts or style is None else prompts.get(style)


def prompt_messages(example: dict, system_prompt: str | None = None) -> list[dict]:
    """The messages up to (not including) the last assistant turn: what a model is asked at evaluation.

    ``system_prompt`` (the style's guidance) is prepended to prompt/response examples; chat examples in
    ``messages`` form keep their own system turns. A chat that ends with a user turn (a prompt-only record)
    is its own prompt.
    """
    if "messages" in example:
        msgs = example["messages"]
        if msgs[-1]["role"] != "assistant":
            return list(msgs)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": example["prompt"]}]


def reference_reply(example: dict, style: str | None) -> str | None:
    """The reference reply an evaluation in ``style`` compares with: ``responses[style]``, else a chat
    record's last assistant turn; None if the example has neither."""
    responses = example.get("responses") or {}
    if style is not None and style in responses:
        return responses[style]
    if "messages" in example and not example.get("unlabelled"):
        return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")
    return None


def to_messages(example: dict, style: str, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of an example for one response style.

    A ``responses[style]`` answers the prompt (for a chat example, e.g. a rollout of one: the conversation
    up to its last assistant turn); otherwise a chat example's ``messages`` serve every style as they are.
    """
    responses = example.get("responses") or {}
    if style in responses:
        return [*prompt_messages(example, system_prompt), {"role": "assistant", "content": responses[style]}]
    if example.get("unlabelled"):
        raise KeyError(
            f"example {example.get('id')!r} is a prompt-only record (no response to learn or score): only "
            "rollout stages read such records"
        )
    if "messages" in example:
        return example["messages"]
    raise KeyError(f"example {example.get('id')!r} has no {style!r} response (has {sorted(responses)})")


def assistant_mask(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask of the assistant tokens (to be learned).

    Uses the template's ``{% generation %}`` markers when it has them; otherwise labels the last assistant
    turn by diffing against the prompt rendered with ``add_generation_prompt``.
    """
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    prompt = tokenizer.apply_chat_template(
        prompt_messages({"messages": messages}), tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    if ids[: len(prompt)] != list(prompt):
        raise ValueError("chat template renders the prompt differently inside the full conversation")
    return ids, [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: dict,
    style: str,
    max_length: int | None = None,
    system_prompt: str | None = None,
    overlong: str = "drop",
) -> EncodedExample | None:
    """Tokenize one example. Longer than ``max_length`` tokens: None (``overlong="drop"``), or its first
    ``max_length`` tokens (``overlong="truncate"``), None if no label token is left."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: choose one of {list(OVERLONG)}")
    ids, mask = assistant_mask(tokenizer, to_messages(example, style, system_prompt))
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if overlong == "drop":
            return None
        ids, mask = ids[:max_length], mask[:max_length]
    # position t predicts token t+1; it is a label when token t+1 is an assistant token
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    encoded = EncodedExample(
        id=str(example["id"]),
        input_ids=ids,
        labels=labels,
        level=example.get("level"),
        style=style,
        truncated=truncated,
    )
    return None if truncated and encoded.num_label_tokens == 0 else encoded
