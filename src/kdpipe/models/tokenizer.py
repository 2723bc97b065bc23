"""A real ``PreTrainedTokenizerFast`` for the built-in task, built with ``tokenizers``.

Character level over printable ASCII plus newline, with ChatML-style special tokens and a chat template
that marks assistant content with ``{% generation %}`` so ``return_assistant_tokens_mask`` works, exactly
as for a hub model. It is saved beside every exported model, so loading goes through ``AutoTokenizer``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS, IM_START, IM_END = "<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, EOS, IM_START, IM_END]
ROLE_TOKENS = ["system", "user", "assistant"]  # whole words, so a role header is two tokens

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the character-level chat tokenizer used by the built-in task."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + space + \n
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,  # generation ends with the assistant turn
        additional_special_tokens=[EOS, IM_START],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(ROLE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
