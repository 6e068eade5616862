"""Tokenizers: the shipped BPE, an HF tokenizer without markers, SentencePiece (Gemma format). (Loading from
gs:// and hub ids: tests/test_storage.py.)"""

import importlib.util
import pathlib

import pytest
import sentencepiece
import transformers

from kardia_jax.data import sources
from kardia_jax.spans import MARKER_TOKENS
from kardia_jax.models import tokenizer as tokenizer_lib
from kardia_jax.models.config import preset

REPO = pathlib.Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "Profile: INFJ.\nSituation: a move."},
    {"role": "user", "content": "I moved to a new city."},
    {"role": "assistant", "content": "<|understanding_begin|>You moved.<|understanding_end|><|reasoning_begin|>New "
                                     "places are hard.<|reasoning_end|><|emotion_begin|>lonely<|emotion_end|>"
                                     "<|response_begin|>That is a big change.<|response_end|>"},
    {"role": "user", "content": "Yes, it is quiet."},
]


def _sample_lines():
    dialogues, _ = sources.load_dialogues(sources.sample_path(), "train")
    return [line for d in dialogues for m in d.messages for line in m["content"].splitlines() if line.strip()]


def _assert_markers_are_single_round_tripping_ids(tok):
    assert set(tok.marker_ids) == set(MARKER_TOKENS) and len(set(tok.marker_ids.values())) == 8
    for marker, marker_id in tok.marker_ids.items():
        assert tok.encode(marker) == [marker_id]
        assert tok.decode([marker_id]) == marker
        assert marker_id < tok.vocab_size
    text = CHAT[2]["content"]
    assert tok.decode(tok.encode(text)) == text
    assert "<|" not in tok.decode(tok.encode(text), skip_special_tokens=True)


def test_shipped_tokenizer_has_markers_chatml_ids_and_loads_with_auto_tokenizer(tokenizer):
    _assert_markers_are_single_round_tripping_ids(tokenizer)
    assert isinstance(tokenizer, tokenizer_lib.HFTokenizer) and tokenizer.num_added_tokens == 0
    assert 1024 <= tokenizer.vocab_size <= preset("tiny-kardia").vocab_size  # the demo policy's embedding fits it
    assert tokenizer.eos_id == tokenizer.encode("<|im_end|>")[0] and tokenizer.stop_ids[0] == tokenizer.eos_id
    assert tokenizer.pad_id == tokenizer.encode("<|endoftext|>")[0]
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_lib.tokenizer_path())
    assert hf.encode(CHAT[2]["content"], add_special_tokens=False) == tokenizer.encode(CHAT[2]["content"])


def test_chatml_rendering(tokenizer):
    expected = ("<|im_start|>system\nProfile: INFJ.\nSituation: a move.<|im_end|>\n"
                "<|im_start|>user\nI moved to a new city.<|im_end|>\n"
                f"<|im_start|>assistant\n{CHAT[2]['content']}<|im_end|>\n"
                "<|im_start|>user\nYes, it is quiet.<|im_end|>\n")
    assert tokenizer.render_chat(CHAT, add_generation_prompt=False) == expected
    with_prompt = tokenizer.render_chat(CHAT, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer.encode_chat(CHAT, add_generation_prompt=True)) == with_prompt


def test_committed_tokenizer_equals_a_fresh_training(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "scripts" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = module.train(sources.training_texts(sources.sample_path()), vocab_size=4096)
    trained.save_pretrained(tmp_path, save_jinja_files=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (pathlib.Path(tokenizer_lib.tokenizer_path()) / name).read_text()


def test_hf_tokenizer_without_markers_gets_them_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers  # pylint: disable=import-outside-toplevel

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_sample_lines(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = tokenizer_lib.load_tokenizer(str(tmp_path))
    assert tok.num_added_tokens == 8 and tok.vocab_size == bpe.get_vocab_size() + 8
    _assert_markers_are_single_round_tripping_ids(tok)
    assert tok.eos_id == bpe.token_to_id("<|im_end|>") and tok.pad_id == bpe.token_to_id("<|endoftext|>")
    assert tok.render_chat(CHAT[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")  # ChatML


def test_hf_template_without_system_role_folds_the_system_message(tokenizer):
    gemma_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] "
                  "+ '<end_of_turn>\\n' }}{% endfor %}")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_lib.tokenizer_path())
    hf.chat_template = gemma_like
    rendered = tokenizer_lib.HFTokenizer(hf).render_chat(CHAT[:2], add_generation_prompt=False)
    assert rendered.startswith(f"<start_of_turn>user\n{CHAT[0]['content']}\n\n{CHAT[1]['content']}<end_of_turn>")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A Gemma-style SentencePiece model trained on the sample: ids pad 0, eos 1, bos 2, unk 3,
    <start_of_turn>/<end_of_turn> as user-defined pieces, no span markers."""
    directory = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_lines()), model_prefix=str(directory / "tokenizer"), vocab_size=800,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2)
    return directory


def test_sentencepiece_tokenizer_adds_markers_and_uses_gemma_chat_format(sentencepiece_dir):
    tok = tokenizer_lib.load_tokenizer(str(sentencepiece_dir))
    assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
    assert tok.num_added_tokens == 8 and tok.vocab_size == 808
    _assert_markers_are_single_round_tripping_ids(tok)
    assert tok.eos_id == tok.encode("<end_of_turn>")[0] and tok.stop_ids == (tok.eos_id, 1) and tok.pad_id == 0

    rendered = tok.render_chat(CHAT, add_generation_prompt=True)
    assert rendered == ("<bos><start_of_turn>user\nProfile: INFJ.\nSituation: a move.\n\nI moved to a new city."
                        "<end_of_turn>\n"
                        f"<start_of_turn>model\n{CHAT[2]['content']}<end_of_turn>\n"
                        "<start_of_turn>user\nYes, it is quiet.<end_of_turn>\n"
                        "<start_of_turn>model\n")
    ids = tok.encode_chat(CHAT, add_generation_prompt=True)
    assert ids[0] == 2  # BOS
    assert tok.decode(ids) == rendered
    assert tok.encode_batch([rendered, "Hi"]) == [ids, tok.encode("Hi")]


def test_sentencepiece_model_already_holding_the_markers_adds_nothing(tmp_path):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_lines()), model_prefix=str(tmp_path / "tokenizer"), vocab_size=800,
        model_type="bpe", byte_fallback=True, user_defined_symbols=list(MARKER_TOKENS), minloglevel=2)
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.num_added_tokens == 2  # only Gemma's <start_of_turn>, <end_of_turn>
    assert all(i < 800 for i in tok.marker_ids.values())
    _assert_markers_are_single_round_tripping_ids(tok)
