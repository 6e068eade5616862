"""Trains the shipped tokenizer, kardia_jax/assets/tokenizer/, on the shipped sample.

A byte-level BPE (Hugging Face `tokenizers`) in the Qwen/ChatML style, small enough for the tiny CPU
models: special tokens <|endoftext|> (padding), <|im_start|>, <|im_end|> (end of turn, eos) and the eight
span markers, then merges learned from the train split's text. Saved with `save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(dir)` and `kardia_jax.models.tokenizer.load_tokenizer(dir)`
load it; tokenizer_config.json carries a ChatML chat template. Deterministic: same sample, same files.

Usage: python scripts/train_tokenizer.py [--sample_dir ...] [--out_dir ...] [--vocab_size 4096]
"""

from __future__ import annotations

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kardia_jax.data.sources import sample_path
from kardia_jax.spans import MARKER_TOKENS
from kardia_jax.data.sources import training_texts
from kardia_jax.models.tokenizer import CHATML_TEMPLATE, tokenizer_path

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, *MARKER_TOKENS)  # ids 0..10, in this order


def train(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START, *MARKER_TOKENS],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample_dir", default=sample_path())
    parser.add_argument("--out_dir", default=tokenizer_path())
    parser.add_argument("--vocab_size", type=int, default=4096)
    args = parser.parse_args()
    tokenizer = train(training_texts(args.sample_dir), args.vocab_size)
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer.save_pretrained(args.out_dir, save_jinja_files=False)  # template inside tokenizer_config.json
    print(f"Saved a {len(tokenizer)}-token tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
