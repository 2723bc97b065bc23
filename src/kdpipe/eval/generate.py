"""Batched greedy (or sampled) generation with the KV cache, with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generation:
    """One generated response: its text, its token count and whether it ended with end-of-turn."""

    text: str
    num_tokens: int
    finished: bool


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    show_progress: bool = True,
    description: str = "generating",
) -> list[Generation]:
    """Generate the next assistant turn of each conversation (chat template, left padding, KV cache)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    # longest prompts first: similar lengths share a batch and the first batch shows the worst memory
    order = sorted(range(len(conversations)), key=lambda i: -len(str(conversations[i])))
    results: list[Generation | None] = [None] * len(conversations)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    try:
        with Progress(transient=True, disable=not show_progress) as progress:
            task = progress.add_task(description, total=len(conversations))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer.apply_chat_template(
                    [conversations[i] for i in idx],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_id,
                    use_cache=True,
                    **sampling,
                )
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for i, tokens in zip(idx, new):
                    finished = eos_id in tokens
                    if finished:
                        tokens = tokens[: tokens.index(eos_id) + 1]
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    results[i] = Generation(text=text, num_tokens=len(tokens), finished=finished)
                progress.advance(task, len(idx))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results  # type: ignore[return-value]
