"""Format, emotion and combined rewards on token ids, checked against the text path (parse_spans).

The tokenizers are small BPEs trained here (a byte-level one, Qwen style, and a Metaspace one,
SentencePiece style) with the eight markers and <|im_end|> as special tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kardia_jax.spans import EMOTIONS, MARKER_TOKENS, SPAN_NAMES, join_spans, normalize_emotion, parse_spans
from kardia_jax.rewards import (
    DEFAULT_WEIGHTS,
    RUBRIC_CRITERIA,
    active_components,
    build_label_table,
    emotion_reward,
    format_reward,
    total_reward,
    whitespace_token_ids,
)

STOP = "<|im_end|>"
T = 128

CORPUS = [
    "I feel so anxious about my exam tomorrow, and I cannot sleep.",
    "She lost her job last week. He wants to comfort her without judging.",
    "It sounds really hard. I'm here for you; would you like to talk about it?",
    "The user is worried about the future and feels alone.",
] + [f"{e} {e.capitalize()} {e.upper()}\n {e}.\n" for e in EMOTIONS] * 2


def train_tokenizer(style: str) -> Tokenizer:
    special = ["<unk>", *MARKER_TOKENS, STOP]
    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


class RawTokenizer:
    """The kardia_jax Tokenizer interface the reward builders use, over a bare `tokenizers.Tokenizer`."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)


class Setup:
    """A tokenizer and everything the rewards need from it, built on the host."""

    def __init__(self, style):
        self.tok = RawTokenizer(train_tokenizer(style))
        self.marker_ids = {m: self.tok.token_to_id(m) for m in MARKER_TOKENS}
        self.stop_ids = np.array([self.tok.token_to_id(STOP)], np.int32)
        self.whitespace_ids = whitespace_token_ids(self.tok)
        self.label_table = build_label_table(self.tok, max_len=8)

    def batch(self, texts):
        """Encodes texts into [N, T] ids and mask; padding after the mask is garbage (markers)."""
        ids = np.full((len(texts), T), self.marker_ids[MARKER_TOKENS[0]], np.int32)
        mask = np.zeros((len(texts), T), np.int32)
        for row, text in enumerate(texts):
            encoded = self.tok.encode(text)
            assert len(encoded) <= T, text
            ids[row, : len(encoded)] = encoded
            mask[row, : len(encoded)] = 1
        return ids, mask

    def text_spans(self, ids, mask):
        """The text path on what the ids say: decode (stop tokens dropped), then parse_spans."""
        kept = [int(i) for i, m in zip(ids, mask) if m and i not in self.stop_ids]
        return parse_spans(self.tok.decode(kept, skip_special_tokens=False))

    def format(self, ids, mask):
        return np.asarray(jitted_format(ids, mask, self.marker_ids, self.stop_ids, self.whitespace_ids))

    def emotion(self, ids, mask, gold):
        gold = np.asarray(gold, np.int32)
        return np.asarray(jitted_emotion(ids, mask, self.marker_ids, gold, self.label_table, self.whitespace_ids))


jitted_format = jax.jit(format_reward)
jitted_emotion = jax.jit(emotion_reward)


@functools.cache
def get_setup(style):
    return Setup(style)


@pytest.fixture(params=["byte_level", "metaspace"])
def setup(request):
    return get_setup(request.param)


def spans(emotion="anxious", **overrides):
    base = {
        "understanding": "The user is worried about the exam.",
        "reasoning": "She cannot sleep, so she feels anxious.",
        "emotion": emotion,
        "response": "It sounds really hard. I'm here for you.",
    }
    return base | overrides


GOOD = join_spans(spans())
M = dict(zip([f"{n}_{side}" for n in SPAN_NAMES for side in ("begin", "end")], MARKER_TOKENS))

FORMAT_CASES = {
    # name: (completion text, expected format reward)
    "well_formed": (GOOD, 1),
    "stop_at_end": (GOOD + STOP, 1),
    "whitespace_around_and_between": ("\n " + join_spans(spans()).replace("|><|", "|>\n\n<|") + "\n" + STOP, 1),
    "padded_spans": (join_spans(spans(emotion="  Anxious \n", response="\n hello \n")) + STOP, 1),
    "missing_reasoning_span": (GOOD.replace(M["reasoning_begin"] + spans()["reasoning"] + M["reasoning_end"], ""), 0),
    "missing_one_marker": (GOOD.replace(M["response_end"], "") + STOP, 0),
    "wrong_span_order": (
        "".join(
            f"<|{n}_begin|>{spans()[n]}<|{n}_end|>" for n in ("understanding", "emotion", "reasoning", "response")
        ),
        0,
    ),
    "end_before_begin": (GOOD.replace(M["emotion_begin"], "@@").replace(M["emotion_end"], M["emotion_begin"])
                         .replace("@@", M["emotion_end"]), 0),
    "empty_span": (join_spans(spans(emotion="")) + STOP, 0),
    "whitespace_only_span": (join_spans(spans(response=" \n  ")) + STOP, 0),
    "duplicated_marker": (join_spans(spans(response=f"hi {M['understanding_end']} there")), 0),
    "duplicated_span": (GOOD + M["response_begin"] + "again" + M["response_end"], 0),
    "text_before": ("Sure! " + GOOD, 0),
    "text_after": (GOOD + " Thanks." + STOP, 0),
    "text_between_spans": (GOOD.replace(M["reasoning_end"], M["reasoning_end"] + "so"), 0),
    "no_markers": ("I feel so anxious about my exam tomorrow." + STOP, 0),
    "empty": ("", 0),
}


def test_format_cases(setup):
    names = list(FORMAT_CASES)
    ids, mask = setup.batch([FORMAT_CASES[n][0] for n in names])
    got = setup.format(ids, mask)
    for row, name in enumerate(names):
        assert got[row] == FORMAT_CASES[name][1], name
        assert got[row] == (setup.text_spans(ids[row], mask[row]) is not None), name


def test_format_respects_the_mask(setup):
    ids, mask = setup.batch([GOOD + STOP])
    cut = mask.copy()
    cut[0, mask[0].sum() - 2 :] = 0  # response_end and the stop token fall outside the mask
    np.testing.assert_array_equal(setup.format(np.concatenate([ids, ids]), np.concatenate([mask, cut])), [1, 0])


def test_format_agrees_with_parse_spans_on_random_edits(setup):
    """Random token-level edits of well-formed completions: ids path == text path on every one."""
    rng = np.random.default_rng(0)
    tok = setup.tok
    vocab = tok.vocab_size
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(vocab)]
    # Content tokens decode to printable ASCII (no byte fragments that could join into whitespace).
    content_ids = [i for i, s in enumerate(texts) if s.strip() and s.isascii() and s.isprintable()
                   and i not in setup.marker_ids.values() and i not in setup.stop_ids and s != "<unk>"]
    markers = list(setup.marker_ids.values())
    pools = [markers, list(setup.whitespace_ids), content_ids]
    base_ids, base_mask = setup.batch([join_spans(spans(emotion=e, response=f"I hear you, {e}."))
                                       for e in EMOTIONS[:8]])
    rows, masks = [], []
    for _ in range(400):
        k = rng.integers(len(base_ids))
        seq = list(base_ids[k, : base_mask[k].sum()])
        for _ in range(rng.integers(0, 3)):
            op, pool = rng.integers(3), pools[rng.integers(3)]
            pos = rng.integers(len(seq) + 1)
            if op == 0:
                seq.insert(pos, int(rng.choice(pool)))
            elif op == 1 and pos < len(seq):
                del seq[pos]
            elif pos < len(seq):
                seq[pos] = int(rng.choice(pool))
        seq = (seq + list(setup.stop_ids))[:T]
        rows.append(seq + [markers[0]] * (T - len(seq)))
        masks.append([1] * len(seq) + [0] * (T - len(seq)))
    ids, mask = np.array(rows, np.int32), np.array(masks, np.int32)
    got = setup.format(ids, mask)
    want = np.array([setup.text_spans(ids[r], mask[r]) is not None for r in range(len(rows))], np.float32)
    np.testing.assert_array_equal(got, want)
    assert 0.2 < got.mean() < 0.8  # both outcomes are exercised


EMOTION_CASES = [
    # (emotion span text, gold label, expected emotion reward)
    ("anxious", "anxious", 1),
    ("Anxious", "anxious", 1),
    ("ANXIOUS", "anxious", 1),
    (" anxious", "anxious", 1),
    ("\nAnxious\n", "anxious", 1),
    ("  anxious \n ", "anxious", 1),
    ("anxious", "sad", 0),
    ("sad", "anxious", 0),
    ("Sad", "sad", 1),
    ("anxious.", "anxious", 0),
    ("very anxious", "anxious", 0),
    ("anxious sad", "anxious", 0),
    ("anx", "anxious", 0),
]


def test_emotion_cases(setup):
    ids, mask = setup.batch([join_spans(spans(emotion=e)) + STOP for e, _, _ in EMOTION_CASES])
    gold = [EMOTIONS.index(g) for _, g, _ in EMOTION_CASES]
    got = setup.emotion(ids, mask, gold)
    for row, (emotion, label, want) in enumerate(EMOTION_CASES):
        assert got[row] == want, (emotion, label)
        parsed = setup.text_spans(ids[row], mask[row])
        assert got[row] == (normalize_emotion(parsed["emotion"]) == label), (emotion, label)


@pytest.mark.parametrize("form", [str.lower, str.capitalize, str.upper, lambda e: f"\n {e.capitalize()}\n"])
def test_every_label_matches_itself_and_no_other(setup, form):
    texts = [join_spans(spans(emotion=form(e))) + STOP for e in EMOTIONS]
    ids, mask = setup.batch(texts)
    np.testing.assert_array_equal(setup.emotion(ids, mask, np.arange(32)), 1)
    np.testing.assert_array_equal(setup.emotion(ids, mask, (np.arange(32) + 1) % 32), 0)


def test_emotion_empty_and_broken_spans(setup):
    texts = [
        join_spans(spans(emotion="")),  # empty span
        join_spans(spans(emotion=" \n ")),  # whitespace-only span
        GOOD.replace(M["emotion_end"], ""),  # no end marker
        GOOD + M["emotion_begin"] + "anxious" + M["emotion_end"],  # emotion span twice
        GOOD.replace(M["response_begin"] + spans()["response"] + M["response_end"], ""),  # other span missing
    ]
    ids, mask = setup.batch(texts)
    gold = [EMOTIONS.index("anxious")] * len(texts)
    np.testing.assert_array_equal(setup.emotion(ids, mask, gold), [0, 0, 0, 0, 1])


def test_emotion_known_differences_from_text_path(setup):
    """Documented: mixed case is accepted by normalize_emotion, not by the id table."""
    ids, mask = setup.batch([join_spans(spans(emotion="aNxIoUs"))])
    assert normalize_emotion(setup.text_spans(ids[0], mask[0])["emotion"]) == "anxious"
    assert setup.emotion(ids, mask, [EMOTIONS.index("anxious")])[0] == 0


def test_label_table_shape_and_padding(setup):
    table = setup.label_table
    assert table.shape[0] == 32 and table.shape[2] == 8 and table.dtype == np.int32
    assert np.all(table[:, :, 0] >= 0)  # no all-padding row: an empty span can never match
    for label, rows in zip(EMOTIONS, table):
        for row in rows:
            assert normalize_emotion(setup.tok.decode([int(i) for i in row if i >= 0])) == label
    with pytest.raises(ValueError, match="max_len"):
        build_label_table(setup.tok, max_len=1)


def test_total_reward_defaults_and_logs():
    n = 4
    fmt = jnp.array([1.0, 0.0, 1.0, 1.0])
    emo = jnp.array([1.0, 1.0, 0.0, 0.0])
    crit = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (n, 5)), jnp.float32)
    total, logs = jax.jit(total_reward)({"format": fmt, "emotion": emo, "rubric": crit})
    np.testing.assert_allclose(total, (fmt + emo + crit.mean(axis=1)) / 3, rtol=1e-6)
    assert DEFAULT_WEIGHTS == {"format": 1 / 3, "emotion": 1 / 3, "rubric": 1 / 3}
    want_keys = {"reward/total", "reward/format", "reward/emotion", "reward/rubric"} | {
        f"reward/rubric/{c}" for c in RUBRIC_CRITERIA
    }
    assert set(logs) == want_keys
    assert RUBRIC_CRITERIA == ("relevance", "empathy", "persona_consistency", "safety", "fluency")
    for i, c in enumerate(RUBRIC_CRITERIA):
        np.testing.assert_array_equal(logs[f"reward/rubric/{c}"], crit[:, i])
    np.testing.assert_allclose(logs["reward/rubric"], crit.mean(axis=1), rtol=1e-6)
    assert all(v.shape == (n,) for v in logs.values())


def test_total_reward_custom_weights_and_errors():
    fmt, emo = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    weights = {"format": 0.25, "emotion": 0.75}
    total, logs = jax.jit(functools.partial(total_reward, weights=weights))({"format": fmt, "emotion": emo})
    np.testing.assert_allclose(total, [0.25, 0.75])
    assert set(logs) == {"reward/total", "reward/format", "reward/emotion"}
    with pytest.raises(ValueError, match="weights"):
        total_reward({"format": fmt}, weights)
    with pytest.raises(ValueError, match="rubric scores"):
        total_reward({"format": fmt, "emotion": emo, "rubric": jnp.zeros((2, 4))})


def test_zero_weights_drop_components():
    """A component of weight 0 is not needed, not logged, and does not enter the total (given or not)."""
    fmt, emo = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    crit = jnp.full((2, 5), 0.5)
    weights = {"format": 0.5, "emotion": 0.5, "rubric": 0.0}
    assert active_components(weights) == ("format", "emotion")
    for components in ({"format": fmt, "emotion": emo}, {"format": fmt, "emotion": emo, "rubric": crit}):
        total, logs = total_reward(components, weights)
        np.testing.assert_allclose(total, [0.5, 0.5], rtol=1e-6)
        assert set(logs) == {"reward/total", "reward/format", "reward/emotion"}
    with pytest.raises(ValueError, match=r"weighted but not given: \['emotion'\]"):
        total_reward({"format": fmt}, weights)
    with pytest.raises(ValueError, match=r"no weight: \['length'\]"):
        total_reward({"format": fmt, "emotion": emo, "length": fmt}, weights)
