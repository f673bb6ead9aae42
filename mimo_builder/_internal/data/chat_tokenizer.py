"""A small byte-level BPE tokenizer with a ChatML chat template, trained locally on given texts.

For tests and demos that need a real Hugging Face tokenizer with a chat template and no download:
``AutoTokenizer.from_pretrained(train_chat_tokenizer(texts, out_dir))`` loads it back. Its special
tokens are ``<|pad|>`` (padding), ``<|endoftext|>`` (end of sequence), ``<|im_start|>`` and
``<|im_end|>`` (turn boundaries), then the given ``tags`` (e.g. ``<image>``), each one token.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from mimo_builder._internal.errors import DependencyError

SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens of every trained tokenizer, with ids 0 to 3 in this order."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; generation prompt
``<|im_start|>assistant\\n``."""


def train_chat_tokenizer(texts: Iterable[str], out_dir, *, vocab_size: int = 512, tags: Sequence[str] = ()) -> str:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` (the same texts give the same
    tokenizer), save it with the ChatML template to ``out_dir`` and return ``out_dir``."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise DependencyError(f"train_chat_tokenizer needs the transformers package ({e}): "
                              f"pip install 'transformers>=5.20'") from e
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *tags]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"train_chat_tokenizer(vocab_size={vocab_size}): a byte-level BPE needs at least "
                         f"{len(alphabet)} byte ids + {len(specials)} special tokens = "
                         f"{len(alphabet) + len(specials)}; give a larger vocab_size")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
        extra_special_tokens=specials[len(SPECIAL_TOKENS) - 2:], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)
