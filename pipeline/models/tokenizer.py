"""Tokenizers built locally (nothing can be downloaded): a small byte-level BPE trained on a corpus.

Byte-level, so any text round-trips even outside the training corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BASE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    extra_special_tokens: Sequence[str] = (),
    model_max_length: int = 4096,
    named_special_tokens: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    ``extra_special_tokens`` (image tokens, chat markers) get ids right after the base specials,
    so they are stable for a given list regardless of the corpus. ``named_special_tokens`` become
    tokenizer attributes (``tok.image_token``, ``tok.image_token_id``), which some processors read
    (InternVL's ``start_image_token``...); their values are added to the specials if missing.
    """
    named = dict(named_special_tokens or {})
    extra_special_tokens = list(extra_special_tokens) + [
        t for t in named.values() if t not in extra_special_tokens
    ]
    specials = list(BASE_SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in BASE_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(specials)),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        **({"extra_special_tokens": named} if named else {}),
    )
    extra = [t for t in extra_special_tokens if t not in BASE_SPECIAL_TOKENS]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast
