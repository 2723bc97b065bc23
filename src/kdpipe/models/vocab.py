"""Teacher and student must share one tokenizer: the stored teacher signal is over token ids of the teacher's
vocabulary, on sequences its chat template rendered. :func:`vocabulary_differences` names what differs between
two tokenizers (:func:`kdpipe.pipeline.checks.check_shared_vocabulary` applies it to a pipeline's models).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from kdpipe.models.fingerprint import tokenizer_fingerprint

EXAMPLES = 5  # differing tokens quoted per kind of difference


def _examples(items: list, n: int = EXAMPLES) -> str:
    shown = ", ".join(items[:n])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > n else shown


def vocabulary_differences(
    first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, names: tuple[str, str] = ("teacher", "student")
) -> list[str]:
    """What differs between two tokenizers (empty when their fingerprints match): vocabulary size, tokens
    only in one, tokens with other ids, chat template, special tokens."""
    fp_a, fp_b = tokenizer_fingerprint(first), tokenizer_fingerprint(second)
    if fp_a["sha256"] == fp_b["sha256"]:
        return []
    a, b = names
    problems = []
    if fp_a["vocab_size"] != fp_b["vocab_size"]:
        problems.append(f"vocab size {fp_a['vocab_size']} ({a}) != {fp_b['vocab_size']} ({b})")
    if fp_a["vocab_sha256"] != fp_b["vocab_sha256"]:
        va, vb = first.get_vocab(), second.get_vocab()
        only_a = sorted((t for t in va if t not in vb), key=va.get)
        only_b = sorted((t for t in vb if t not in va), key=vb.get)
        moved = sorted((t for t in va if t in vb and va[t] != vb[t]), key=va.get)
        if only_a:
            problems.append(f"tokens only in the {a}'s vocabulary: {_examples([repr(t) for t in only_a])}")
        if only_b:
            problems.append(f"tokens only in the {b}'s vocabulary: {_examples([repr(t) for t in only_b])}")
        if moved:
            problems.append(
                f"tokens with different ids ({a} vs {b}): {_examples([f'{t!r} {va[t]} vs {vb[t]}' for t in moved])}"
            )
    if fp_a["chat_template_sha256"] != fp_b["chat_template_sha256"]:
        problems.append("the chat templates differ")
    sa, sb = first.special_tokens_map, second.special_tokens_map
    special = [f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if special:
        problems.append(f"special tokens differ ({a} vs {b}): {'; '.join(special)}")
    return problems or ["the tokenizers' fingerprints differ"]
