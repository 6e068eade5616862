"""Data: schema validation, sources, turn samples, the shipped sample and the Grain pipelines."""

import collections
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from kardia_jax.data import pipeline, prompts, schema, sources
from kardia_jax.spans import EMOTIONS, MARKER_TOKENS, SPAN_NAMES, parse_spans

REPO = pathlib.Path(__file__).resolve().parents[1]


def _turn(understanding="You lost your keys.", emotion="annoyed", xml=False):
    spans = {"understanding": understanding, "reasoning": "Losing things is a hassle.", "emotion": emotion,
             "response": "That is frustrating. Want to retrace your steps?"}
    if xml:
        return "".join(f"<{n}>{spans[n]}</{n}>" for n in SPAN_NAMES)
    return "".join(f"<|{n}_begin|>{spans[n]}<|{n}_end|>" for n in SPAN_NAMES)


def _row(pairs=3, xml=False, emotion="Annoyed "):
    messages = [{"role": "system", "content": "Profile: INTJ. Situation: lost keys."}]
    for k in range(pairs):
        messages.append({"role": "user", "content": f"User message {k}."})
        messages.append({"role": "assistant", "content": _turn(understanding=f"Turn {k}.", xml=xml)})
    return {"person": "MBTI: INTJ\nAbout: I fix clocks.", "mbti": "INTJ", "emotion": emotion,
            "situation": "They lost their keys.", "anon_username": "user_1", "messages": messages}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def train_samples():
    samples, _ = pipeline.load_samples(sources.sample_path(), "train")
    return samples


# Schema and prompts.


def test_both_tag_styles_parse_to_the_same_dialogue():
    markers = schema.parse_dialogue(_row(xml=False), path="a.jsonl", row=1)
    tags = schema.parse_dialogue(_row(xml=True), path="a.jsonl", row=1)
    assert markers.messages == tags.messages
    assert parse_spans(_turn(xml=True)) == parse_spans(_turn(xml=False))
    assert all(m in markers.messages[2]["content"] for m in MARKER_TOKENS)
    assert markers.emotion == "annoyed"


def test_a_dialogue_with_k_assistant_turns_gives_k_samples_with_the_history_as_prompt():
    dialogue = schema.parse_dialogue(_row(pairs=3), path="a.jsonl", row=7, dialogue_id="train-7")
    samples = prompts.expand_dialogue(dialogue)
    assert [s.turn_index for s in samples] == [0, 1, 2]
    for k, sample in enumerate(samples):
        assert len(sample.prompt) == 2 + 2 * k and sample.prompt[:2] == dialogue.messages[:2]
        assert sample.prompt[-1] == {"role": "user", "content": f"User message {k}."}
        assert parse_spans(sample.target)["understanding"] == f"Turn {k}."
        assert (sample.dialogue_id, sample.row, sample.emotion) == ("train-7", 7, "annoyed")
    assert samples[2].prompt[2]["content"] == "That is frustrating. Want to retrace your steps?"  # response span
    full = prompts.expand_dialogue(dialogue, history="full")
    assert full[2].prompt == dialogue.messages[:6] and full[2].target == samples[2].target


def test_history_modes_keep_the_label_out_of_later_prompts():
    """With one label per dialogue, "full" history hands it to every later turn; the default does not."""
    dialogue = schema.parse_dialogue(_row(pairs=3), path="a.jsonl", row=1)
    leaked = {h: [m["content"] for m in prompts.expand_dialogue(dialogue, history=h)[2].prompt
                  if m["role"] == "assistant"] for h in prompts.HISTORY_MODES}
    assert all("<|emotion_begin|>annoyed<|emotion_end|>" in c for c in leaked["full"])
    assert all("<|emotion_begin|>" not in c and "<|reasoning_begin|>" in c for c in leaked["no_emotion"])
    assert leaked["response"] == ["That is frustrating. Want to retrace your steps?"] * 2
    with pytest.raises(ValueError, match="data.history"):
        prompts.expand_dialogue(dialogue, history="none")
    for history in prompts.HISTORY_MODES:  # the judge reads response spans whatever the mode
        sample = prompts.expand_dialogue(dialogue, history=history)[1]
        assert prompts.dialogue_context(sample) == ("User: User message 0.\nAssistant: " + leaked["response"][0]
                                                   + "\nUser: User message 1.")


def test_leak_report_on_the_shipped_sample(train_samples):
    """The figures of kardia_jax/data/prompts.py's docstring (python -m kardia_jax.data.prompts)."""
    train, _ = sources.load_dialogues(sources.sample_path(), "train")
    full = prompts.leak_report(prompts.expand_dialogues(train, history="full"))
    assert full == {"span": (35, 150), "word": (35, 150), "turns": (71, 198)}
    no_emotion = prompts.leak_report(prompts.expand_dialogues(train, history="no_emotion"))
    assert no_emotion == {"span": (0, 0), "word": (35, 150), "turns": (71, 198)}
    assert prompts.leak_report(train_samples) == {"span": (0, 0), "word": (0, 0), "turns": (71, 198)}


def _bad(mutate):
    row = _row()
    mutate(row)
    return row


BAD_ROWS = {
    "missing_field": (lambda r: r.pop("situation"), "situation"),
    "wrong_type": (lambda r: r.update(mbti=4), "mbti"),
    "bad_spans": (lambda r: r["messages"][4].update(content="<|understanding_begin|>only this<|understanding_end|>"),
                  "messages[4].content"),
    "unknown_emotion": (lambda r: r.update(emotion="happyish"), "emotion"),
    "role_order": (lambda r: r["messages"][1].update(role="assistant"), "messages[1].role"),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_raises_a_named_error_and_is_counted_when_skipped(tmp_path, reason):
    mutate, field = BAD_ROWS[reason]
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(), _bad(mutate)])
    with pytest.raises(schema.DataError) as raised:
        sources.load_dialogues(path, "train")
    error = raised.value
    assert (error.path, error.row, error.field, error.reason) == (path, 2, field, reason)
    assert path in str(error) and "row 2" in str(error) and f"'{field}'" in str(error) and "Fix:" in str(error)
    dialogues, stats = sources.load_dialogues(path, "train", on_bad_row="skip")
    assert len(dialogues) == 1 and stats.rows_read == 2 and stats.skipped == {reason: 1}


def test_invalid_json_and_misspelled_emotion_say_how_to_fix(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [_row(), "{not json", _row(emotion="anxiuos")])
    _, stats = sources.load_dialogues(path, "train", on_bad_row="skip")
    assert stats.skipped == {"bad_json": 1, "unknown_emotion": 1} and stats.dialogues == 1
    with pytest.raises(schema.DataError, match="Did you mean 'anxious'"):
        schema.parse_dialogue(_row(emotion="anxiuos"), path=path, row=3)


def test_difficulty_from_the_row_or_from_the_rule():
    stated = _row(pairs=2)
    stated["messages"][3]["content"] = "I am so annoyed."
    dialogue = schema.parse_dialogue(stated, path="a", row=1)
    assert [s.difficulty for s in prompts.expand_dialogue(dialogue)] == ["hard", "easy"]
    by_turn = prompts.DifficultyRule(kind="turn_index", easy_turns=1)
    assert [s.difficulty for s in prompts.expand_dialogue(dialogue, by_turn)] == ["easy", "hard"]
    marked = schema.parse_dialogue({**stated, "difficulty": "hard"}, path="a", row=1)
    assert {s.difficulty for s in prompts.expand_dialogue(marked)} == {"hard"}


@pytest.mark.parametrize("label,text,easy", [
    ("content", "I read the content of the email twice.", False),
    ("content", "Honestly, I feel content.", True),
    ("content", "I'm really content with how it went.", True),
    ("prepared", "I'm prepared for the worst, to be honest.", False),
    ("prepared", "I finally feel prepared.", True),
    ("caring", "I am caring for my dad this week.", False),
    ("caring", "Caring people surround me.", False),
    ("trusting", "Trusting the bus timetable was a mistake.", False),
    ("trusting", "If I had to name it, I would say trusting.", True),
    ("faithful", "She stayed faithful to the old recipe.", False),
    ("faithful", "The only word I have for it is faithful.", True),
    ("annoyed", "Annoyed? Yes.", True),  # an unambiguous label counts as a whole word anywhere
])
def test_ambiguous_labels_count_only_in_a_feeling_construction(label, text, easy):
    rule = prompts.DifficultyRule()
    prompt = ({"role": "system", "content": "s"}, {"role": "user", "content": text})
    assert rule.difficulty(prompt, label, 0) == ("easy" if easy else "hard")


# Sources.


def test_directory_parquet_and_jsonl_sources_agree(tmp_path):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    rows = [_row(pairs=2), _row(pairs=3, xml=True)]
    _write_jsonl(tmp_path / "test.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_jsonl, _ = sources.load_dialogues(str(tmp_path), "test")
    from_parquet, stats = sources.load_dialogues(str(tmp_path), "train")
    assert stats.source.endswith("train.parquet")
    assert [d.messages for d in from_jsonl] == [d.messages for d in from_parquet]
    with pytest.raises(FileNotFoundError, match="No validation.jsonl"):
        sources.load_dialogues(str(tmp_path), "validation")


# The shipped sample.


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_sample_covers_all_emotions_with_disjoint_personas():
    train, train_stats = sources.load_dialogues(sources.sample_path(), "train")
    test, _ = sources.load_dialogues(sources.sample_path(), "test")
    assert train_stats.rows_skipped == 0
    assert {d.emotion for d in train} == set(EMOTIONS)
    assert not {d.person for d in train} & {d.person for d in test}
    assert 7 <= np.mean([len(d.messages) - 1 for d in train + test]) <= 9  # messages after the system one
    raw = (pathlib.Path(sources.sample_path()) / "train.jsonl").read_text()
    assert "<understanding>" in raw and "<|understanding_begin|>" in raw
    samples = prompts.expand_dialogues(train)
    assert {s.difficulty for s in samples} == {"easy", "hard"}


def test_shipped_sample_label_comes_from_the_user_words_not_the_system_message():
    train, _ = sources.load_dialogues(sources.sample_path(), "train")
    test, _ = sources.load_dialogues(sources.sample_path(), "test")
    labels_by_system = collections.defaultdict(set)
    for d in train:
        labels_by_system[d.messages[0]["content"]].add(d.emotion)
    assert all(len(labels) >= 2 for labels in labels_by_system.values())  # persona + situation: no label
    assert not {(d.situation, d.emotion) for d in test} & {(d.situation, d.emotion) for d in train}

    def user_text(dialogues, label):
        return " ".join(m["content"] for d in dialogues if d.emotion == label
                        for m in d.messages if m["role"] == "user")

    module = _load_script("make_sample_data")
    for d in test:  # every test label is in train, with the same cues
        cues = module.EMOTION_BANK[d.emotion].cues
        assert all(cue in user_text(train, d.emotion) for cue in cues)
        assert any(cue in user_text(test, d.emotion) for cue in cues)
    samples = prompts.expand_dialogues(test)
    assert 0.25 <= np.mean([s.difficulty == "hard" for s in samples]) <= 0.75


def test_committed_sample_equals_a_fresh_run_of_the_script():
    module = _load_script("make_sample_data")
    for name, rows in zip(("train", "test"), module.build_sample()):
        committed = (pathlib.Path(sources.sample_path()) / f"{name}.jsonl").read_text(encoding="utf-8")
        assert committed == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# Pipelines.


def _order(pipe):
    return np.concatenate([b["sample_index"] for b in pipe]).tolist()


def test_shuffle_is_deterministic_per_seed(train_samples, tokenizer):
    def order(seed):
        config = pipeline.BatchConfig(global_batch_size=2, max_length=512, seed=seed)  # divides the sample count
        return _order(pipeline.grpo_pipeline(train_samples, tokenizer, config, subset="all", process_index=0,
                                             process_count=1))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(len(train_samples)))


def test_processes_see_disjoint_shards_that_cover_the_data(train_samples, tokenizer):
    config = pipeline.BatchConfig(global_batch_size=2, max_length=512)
    shards = [_order(pipeline.grpo_pipeline(train_samples, tokenizer, config, subset="all", process_index=p,
                                            process_count=2)) for p in range(2)]
    assert len(train_samples) % 2 == 0
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(train_samples)))


def test_processes_pad_each_global_batch_to_one_length_and_fill_a_short_last_batch(train_samples, tokenizer):
    """A multi-host step needs the same shapes on every process: the bucket is chosen from the rows of
    the whole global batch, and a short last batch (no drop_remainder) is filled up with `valid` 0 rows."""
    config = pipeline.BatchConfig(global_batch_size=4, max_length=2048, bucket_lengths=tuple(range(32, 2049, 32)),
                                  shuffle=False, drop_remainder=False)
    samples = train_samples[:10]  # 2 full global batches of 4, then 2 real rows
    shards = [list(pipeline.grpo_pipeline(samples, tokenizer, config, subset="all", process_index=p,
                                          process_count=2)) for p in range(2)]
    alone = list(pipeline.grpo_pipeline(samples, tokenizer, config, subset="all", process_index=0, process_count=1))
    assert len(shards[0]) == len(shards[1]) == len(alone) == 3
    lengths = {b["prompt_tokens"].shape[1] for b in alone}
    assert len(lengths) > 1, "the sample should need several buckets for this test to mean anything"
    for whole, first, second in zip(alone, *shards):
        assert first["prompt_tokens"].shape == second["prompt_tokens"].shape == (2, whole["prompt_tokens"].shape[1])
        assert np.array_equal(np.stack([first["sample_index"], second["sample_index"]], 1).ravel(), whole["sample_index"])
    assert alone[-1]["valid"].tolist() == [1, 1, 0, 0]
    assert shards[0][-1]["valid"].tolist() == [1, 0] and shards[1][-1]["valid"].tolist() == [1, 0]


def test_a_restored_iterator_continues_with_the_next_batches(train_samples, tokenizer):
    config = pipeline.BatchConfig(global_batch_size=16, max_length=384, num_epochs=None, seed=3)
    pipe = pipeline.sft_pipeline(train_samples, tokenizer, config, subset="all", process_index=0, process_count=1)
    steps = pipe.batches_per_epoch + 2  # the saved state lies in the second epoch
    uninterrupted = iter(pipe)
    for _ in range(steps):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # what a checkpoint stores
    expected = [next(uninterrupted) for _ in range(3)]
    restored = iter(pipe)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_loss_mask_covers_exactly_the_target_and_its_end_of_turn(train_samples, tokenizer):
    config = pipeline.BatchConfig(global_batch_size=8, max_length=1024, shuffle=False)  # long enough: no truncation
    pipe = pipeline.sft_pipeline(train_samples, tokenizer, config, subset="easy", process_index=0, process_count=1)
    assert pipe.length_stats.truncated == 0
    easy = [s for s in train_samples if s.difficulty == "easy"]
    batch = next(iter(pipe))
    assert set(batch) == {"tokens", "input_mask", "loss_mask", "positions", "valid"}
    assert batch["tokens"].shape[1] in config.buckets() and batch["tokens"].dtype == np.int32
    for row, sample in enumerate(easy[:8]):
        tokens, loss_mask, input_mask = batch["tokens"][row], batch["loss_mask"][row], batch["input_mask"][row]
        assert tokenizer.decode(tokens[loss_mask == 1]) == sample.target + "<|im_end|>"
        prompt = tokens[(input_mask == 1) & (loss_mask == 0)]
        assert tokenizer.decode(prompt) == tokenizer.render_chat(sample.prompt, add_generation_prompt=True)
        assert np.all(loss_mask <= input_mask) and input_mask[0] == 1
        assert np.array_equal(batch["positions"][row], np.arange(len(tokens)) * input_mask)


def test_grpo_batch_is_left_padded_and_ends_with_the_generation_prompt(train_samples, tokenizer):
    config = pipeline.BatchConfig(global_batch_size=4, max_length=512, bucket_lengths=(128, 256, 512))
    pipe = pipeline.grpo_pipeline(train_samples, tokenizer, config, process_index=0, process_count=1)
    batch = next(iter(pipe))
    assert batch["prompt_tokens"].shape[1] in (128, 256, 512)
    for row in range(4):
        sample = pipe.samples[batch["sample_index"][row]]
        assert sample.difficulty == "hard" and EMOTIONS[batch["emotion_id"][row]] == sample.emotion
        mask = batch["prompt_mask"][row]
        assert mask[-1] == 1 and np.all(np.diff(mask) >= 0)  # padding only on the left
        text = tokenizer.decode(batch["prompt_tokens"][row][mask == 1])
        assert text == tokenizer.render_chat(sample.prompt, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")


def test_overlong_samples_are_truncated_from_the_oldest_turns_or_dropped(train_samples, tokenizer):
    longest = max(train_samples, key=lambda s: len(s.prompt))
    full = len(tokenizer.encode_chat(longest.prompt, add_generation_prompt=True))
    config = pipeline.BatchConfig(global_batch_size=1, max_length=full - 1, shuffle=False)
    pipe = pipeline.grpo_pipeline([longest], tokenizer, config, subset="all", process_index=0, process_count=1)
    assert (pipe.length_stats.truncated, pipe.length_stats.dropped) == (1, 0)
    batch = next(iter(pipe))
    text = tokenizer.decode(batch["prompt_tokens"][0][batch["prompt_mask"][0] == 1])
    assert longest.prompt[0]["content"] in text and longest.prompt[-1]["content"] in text
    assert longest.prompt[1]["content"] not in text
    dropping = pipeline.BatchConfig(global_batch_size=1, max_length=full - 1, overlong="drop")
    with pytest.raises(ValueError, match="make no batch"):
        pipeline.grpo_pipeline([longest], tokenizer, dropping, subset="all", process_index=0, process_count=1)


def test_bucket_lengths_default_and_validation():
    assert pipeline.BatchConfig(global_batch_size=1, max_length=384).buckets() == (64, 128, 256, 384)
    assert pipeline.BatchConfig(global_batch_size=1, max_length=256).buckets() == (64, 128, 256)
    with pytest.raises(ValueError, match="add 512 to bucket_lengths"):
        pipeline.BatchConfig(global_batch_size=1, max_length=512, bucket_lengths=(128, 256)).buckets()


def test_worker_processes_give_the_same_batches(train_samples, tokenizer):
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; absl.app.run parses them in the trainers
        flags.FLAGS.mark_as_parsed()

    def batches(workers):
        config = pipeline.BatchConfig(global_batch_size=8, max_length=384, worker_count=workers)
        it = iter(pipeline.sft_pipeline(train_samples, tokenizer, config, process_index=0, process_count=1))
        out = [next(it)["tokens"] for _ in range(4)]
        it.close()
        return out

    assert all(np.array_equal(a, b) for a, b in zip(batches(0), batches(2)))



class _Lengths:
    """A per-sample context of fixed shape (a class, so Grain's worker processes could unpickle it)."""

    def __call__(self, samples):
        return {"ids": np.array([[len(s.target), len(s.prompt)] for s in samples], np.int32)}  # [n, 2]


def test_grpo_batches_carry_each_prompts_context_rows(train_samples, tokenizer):
    """grpo_pipeline(contexts=...): each batch holds, under judge_context, the rows of its own prompts."""
    config = pipeline.BatchConfig(global_batch_size=4, max_length=256, seed=1)
    pipe = pipeline.grpo_pipeline(train_samples, tokenizer, config, subset="all", contexts=_Lengths())
    for batch in list(pipe)[:3]:
        expected = _Lengths()([pipe.samples[i] for i in batch["sample_index"]])["ids"]
        np.testing.assert_array_equal(batch["judge_context"]["ids"], expected)
    assert "judge_context" not in next(iter(pipeline.grpo_pipeline(train_samples, tokenizer, config, subset="all")))


class _RightPadded:
    """Judge-like contexts: right-padded ids and mask [n, 100], each sample's length from its target."""

    def __call__(self, samples):
        lengths = np.array([len(s.target) % 100 + 1 for s in samples])  # [n], 1..100
        mask = (np.arange(100)[None, :] < lengths[:, None]).astype(np.int32)
        return {"context_ids": mask * 7, "context_mask": mask}


def test_grpo_batches_cut_judge_contexts_to_the_narrowest_width_that_holds_them(train_samples, tokenizer):
    config = pipeline.BatchConfig(global_batch_size=4, max_length=256, seed=1)
    assert pipeline.context_widths(100, 3) == (64, 100) and pipeline.context_widths(1536, 3) == (384, 768, 1536)
    pipe = pipeline.grpo_pipeline(train_samples, tokenizer, config, subset="all", contexts=_RightPadded(),
                                  context_buckets=3)
    widths = set()
    for batch in pipe:
        full = _RightPadded()([pipe.samples[i] for i in batch["sample_index"]])
        width = batch["judge_context"]["context_ids"].shape[1]
        longest = int(full["context_mask"].sum(axis=1).max())
        assert width == (64 if longest <= 64 else 100), (width, longest)
        for name, array in full.items():
            np.testing.assert_array_equal(batch["judge_context"][name], array[:, :width])
        widths.add(width)
    assert widths == {64, 100}  # both widths occur in the sample

