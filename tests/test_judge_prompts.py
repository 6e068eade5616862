"""The judge's host-side prompt building: single-token score digits, the vocabulary check, and piecewise
tokenization equal to the whole prompt's. The scorer and the in-graph packing: test_judge.py."""

import pytest

from kardia_jax.data.pipeline import load_samples
from kardia_jax.data.sources import sample_path
from kardia_jax.models import preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.rewards import rubric
from kardia_jax.rewards.judge_prompts import PromptBuilder, same_vocabulary
from kardia_jax.spans import parse_spans

JUDGE_MODEL = preset("tiny-qwen2", vocab_size=2176)  # the judge model's sizes the prompts are checked against


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_path())


def _builder(tokenizer, **budgets) -> PromptBuilder:
    return PromptBuilder(tokenizer, vocab_size=JUDGE_MODEL.vocab_size, max_positions=JUDGE_MODEL.max_position_embeddings,
                         **budgets)


def test_score_tokens_must_be_single_tokens(tokenizer):
    class SplitsThree:
        """The shipped tokenizer, except that "3" takes two tokens."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text):
            return [29, 29] if text == "3" else tokenizer.encode(text)

    with pytest.raises(ValueError, match=r"encodes '3' as 2 tokens"):
        _builder(SplitsThree(), max_context_tokens=512, max_response_tokens=256)


def test_vocabulary_detection(tokenizer):
    assert same_vocabulary(tokenizer, load_tokenizer(tokenizer_path()))


def test_piecewise_ids_are_the_whole_prompts_tokenization(tokenizer):
    """The judge reads pieces tokenized one by one; on the shipped tokenizer that is exactly the
    tokenization of the whole rendered prompt (within budget), i.e. a normal chat for the judge."""
    roomy = _builder(tokenizer, max_context_tokens=1024, max_response_tokens=256)
    train, _ = load_samples(sample_path(), "train")
    for sample in train[:12]:
        completion = sample.target + "<|im_end|>"
        tokens, mask = roomy.full_prompts(roomy.assemble_texts([completion], [sample]))
        whole = tokenizer.encode(roomy.template.render("".join(rubric.context_parts(sample)), parse_spans(sample.target)["response"], 0))
        suffix = tokenizer.encode(roomy.template.suffixes[0])
        assert list(tokens[0][mask[0] > 0]) + suffix == whole
