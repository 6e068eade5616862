"""The config schema and its validation: shipped configs validate, each bad setting is rejected naming its
key, the entry points validate first, and every key the code reads is declared in `base_config()`."""

import contextlib
import glob
import importlib.util
import math
import os
import types
from unittest import mock

import ml_collections
import pytest
from flax import nnx

from kardia_jax import config_checks
from kardia_jax import evaluate, sft, train
from kardia_jax.config import base_config
from kardia_jax.config_checks import ConfigError, check_policy_positions, validate
from kardia_jax.models import Decoder, preset
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.rewards.judge import RubricJudge

CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))
DEVICES = 8  # tests/conftest.py's fake CPU devices


def load_config_file(path):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def declared_devices(config) -> int:
    """The chips of a TPU config's topology (e.g. v5e:4x8 -> 32); for a config without one, what its
    mesh sizes ask for (-1 counts as 1)."""
    if config.topology:
        return math.prod(int(x) for x in config.topology.split(":")[1].split("x"))
    return math.prod(max(config.mesh[axis], 1) for axis in ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("stage", config_checks.STAGES)
def test_shipped_configs_validate(path, stage):
    config = load_config_file(path)
    validate(config, stage, device_count=declared_devices(config))


def valid_config():
    """Valid for every stage on the 8 test devices (data 2 x fsdp 4)."""
    c = base_config()
    c.model.preset = "tiny-qwen2"
    c.mesh.data = 2
    c.data.max_length = 256
    c.sft.global_batch_size = 16
    c.sft.grad_accum_steps = 2
    c.sft.eval_max_new_tokens = 32
    c.eval.max_new_tokens = 32
    c.grpo.prompts_per_step = 8
    c.grpo.num_minibatches = 2
    c.judge.from_policy = True
    return c


def test_the_valid_config_validates():
    for stage in config_checks.STAGES:
        validate(valid_config(), stage, device_count=DEVICES)


def _set(**changes):
    def apply(c):
        for key, value in changes.items():
            section, name = key.split("__")
            c[section][name] = value
    return apply


def _set_reward(name, value):
    def apply(c):
        c.grpo.reward_weights[name] = value
    return apply


BAD_CASES = [
    # (what to change, stage, a regex the error must contain: the key(s) and the fix)
    (_set(mesh__fsdp=3), "sft", r"mesh\.data, mesh\.fsdp, mesh\.tensor: .*need 6 devices but 8"),
    (_set(mesh__data=-1), "sft", r"mesh\.data, mesh\.fsdp, mesh\.tensor: .*at most one of them may be -1"),
    (_set(sft__global_batch_size=12), "sft", r"sft\.global_batch_size=12 must be a multiple of sft\.grad_accum_steps=2 x the 8"),
    (_set(sft__grad_accum_steps=3), "sft", r"sft\.global_batch_size=16 must be a multiple of sft\.grad_accum_steps=3"),
    (_set(grpo__prompts_per_step=4, grpo__num_minibatches=1), "grpo", r"grpo\.prompts_per_step=4 must be a multiple of the 8"),
    (_set(grpo__num_minibatches=3), "grpo", r"grpo\.num_minibatches=3 must divide grpo\.prompts_per_step=8"),
    (_set(grpo__num_samples=1), "grpo", r"grpo\.num_samples=1 with grpo\.scale_rewards='group'"),
    (_set(model__hf_path="Qwen/Qwen2.5-3B-Instruct"), "eval", r"model: set exactly one of model\.preset, model\.hf_path"),
    (_set(model__preset=""), "sft", r"model: set exactly one of model\.preset, model\.hf_path; got none"),
    (_set(model__preset="qwen-9000"), "sft", r"model\.preset='qwen-9000': use one of"),
    (_set(judge__from_policy=False), "grpo", r"judge: set exactly one of judge\.from_policy, judge\.preset, judge\.hf_path"),
    (_set(judge__preset="tiny-qwen2"), "grpo", r"judge: set exactly one of .*got \['from_policy', 'preset'\]"),
    (_set(data__source="/no/such/dir/train.jsonl"), "sft", r"data\.source='/no/such/dir/train\.jsonl': no such file"),
    (_set(tokenizer__path="./no_such_tokenizer"), "eval", r"tokenizer\.path='\./no_such_tokenizer': no such file"),
    (_set(judge__tokenizer_path="/no/such/tokenizer"), "grpo", r"judge\.tokenizer_path='/no/such/tokenizer': no such"),
    (_set(grpo__init_from="/no/such/checkpoint"), "grpo", r"grpo\.init_from='/no/such/checkpoint': no such"),
    (_set(data__on_bad_row="ignore"), "sft", r"data\.on_bad_row='ignore': use one of \('raise', 'skip'\)"),
    (_set(data__overlong="cut"), "eval", r"data\.overlong='cut': use one of"),
    (_set(data__difficulty_rule="length"), "grpo", r"data\.difficulty_rule='length': use one of"),
    (_set(data__history="reasoning"), "sft", r"data\.history='reasoning': use one of \('full', 'no_emotion', 'response'\)"),
    (_set(sft__subset="medium"), "sft", r"sft\.subset='medium': use one of \('easy', 'hard', 'all'\)"),
    (_set(grpo__kl_estimator="k4"), "grpo", r"grpo\.kl_estimator='k4': use one of \('k1', 'k2', 'k3'\)"),
    (_set(grpo__loss_aggregation="sum"), "grpo", r"grpo\.loss_aggregation='sum': use one of"),
    (_set(grpo__scale_rewards="std"), "grpo", r"grpo\.scale_rewards='std': use one of"),
    (_set(sft__mu_dtype="float16"), "sft", r"sft\.mu_dtype='float16': use one of \('float32', 'bfloat16'\)"),
    (_set(grpo__mu_dtype="int8"), "grpo", r"grpo\.mu_dtype='int8': use one of"),
    (_set(model__remat="everything"), "sft", r"model\.remat='everything': use one of"),
    (_set(model__dtype="float16"), "eval", r"model\.dtype='float16': use one of \('float32', 'bfloat16'\)"),
    (_set(judge__param_dtype="int8"), "grpo", r"judge\.param_dtype='int8': use one of"),
    (_set_reward("rubric", -1.0), "grpo", r"grpo\.reward_weights=.*finite and >= 0"),
    (lambda c: [_set_reward(n, 0.0)(c) for n in ("format", "emotion", "rubric")], "grpo", r"at least one is > 0"),
    (_set(judge__rows_per_chunk=-1), "grpo", r"judge\.rows_per_chunk=-1: must be >= 0"),
    (_set(sft__eval_max_new_tokens=256), "sft", r"sft\.eval_max_new_tokens=256 leaves no prompt budget in data\.max_length=256"),
    (_set(eval__max_new_tokens=256), "eval", r"eval\.max_new_tokens=256 leaves no prompt budget in data\.max_length=256"),
    (_set(eval__batch_size=12), "eval", r"eval\.batch_size=12 must be a multiple of the 8 devices"),
    (_set(eval__judge_mode="sampled"), "eval", r"eval\.judge_mode='sampled': use one of \('read', 'decoded', 'both', 'none'\)"),
    (_set(eval__judge_decode_tokens=0), "eval", r"eval\.judge_decode_tokens=0: must be a positive integer"),
    (_set(eval__temperature=-1.0), "eval", r"eval\.temperature=-1\.0: must be >= 0"),
    (_set(eval__max_samples=-1), "eval", r"eval\.max_samples=-1: must be an integer >= 0"),
    (_set(judge__from_policy=False), "eval", r"judge: set exactly one of .*got none \(eval\.judge_mode='read' needs the judge\)"),
    (_set(sft__log_every=0), "sft", r"sft\.log_every=0: must be a positive integer"),
    (_set(grpo__max_new_tokens=0), "grpo", r"grpo\.max_new_tokens=0: must be a positive integer"),
    (_set(grpo__log_every=0), "grpo", r"grpo\.log_every=0: must be a positive integer"),
    # tiny-qwen2's max_position_embeddings is 32768.
    (_set(data__max_length=40_000), "sft", r"data\.max_length = 40000 positions, past the policy's max_position_embeddings=32768"),
    (_set(data__max_length=32_700, grpo__max_new_tokens=100), "grpo",
     r"data\.max_length \+ grpo\.max_new_tokens = 32800 positions, .*lower data\.max_length or grpo\.max_new_tokens"),
]


@pytest.mark.parametrize("change, stage, message", BAD_CASES)
def test_bad_settings_are_rejected_naming_their_key(change, stage, message):
    config = valid_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate(config, stage, device_count=DEVICES)


def test_one_error_lists_every_problem():
    config = valid_config()
    config.grpo.kl_estimator, config.data.on_bad_row = "k4", "ignore"
    with pytest.raises(ConfigError, match=r"2 problem\(s\)") as error:
        validate(config, "grpo", device_count=DEVICES)
    assert "grpo.kl_estimator" in str(error.value) and "data.on_bad_row" in str(error.value)


def test_stages_check_only_what_they_use():
    config = valid_config()
    config.judge.from_policy = False  # no judge: SFT does not need one
    config.grpo.reward_weights.rubric = 0.0  # nor GRPO without the rubric
    config.eval.judge_mode = "none"  # nor evaluation without the rubric scores
    for stage in config_checks.STAGES:
        validate(config, stage, device_count=DEVICES)


def test_loaded_checkpoints_and_judges_are_checked_against_their_positions():
    """What `validate` cannot know up front (a checkpoint's, a judge's prompt length) is checked on load."""
    short = preset("tiny-qwen2", max_position_embeddings=200)
    with pytest.raises(ConfigError, match=r"data\.max_length = 256 positions, past the policy's max_position_embeddings=200"):
        check_policy_positions(valid_config(), "eval", short)
    check_policy_positions(valid_config(), "eval", preset("tiny-qwen2", max_position_embeddings=256))

    judge_model = nnx.eval_shape(lambda: Decoder(short, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"judge\.max_context_tokens=512 \+ judge\.max_response_tokens=256\), past "
                                         r"the judge model's max_position_embeddings=200"):
        RubricJudge(judge_model, load_tokenizer(tokenizer_path()), max_context_tokens=512, max_response_tokens=256)


def test_entry_points_validate_before_loading(monkeypatch):
    config = valid_config()
    config.grpo.kl_estimator = config.data.on_bad_row = "nope"  # bad for every stage (data.on_bad_row)
    with pytest.raises(ConfigError, match="cannot run sft"):
        sft.run(config)
    with pytest.raises(ConfigError, match="cannot run grpo"):
        train.run(config)
    # evaluate.main reads its flags from absl's FLAGS (which console.setup reads too, for --verbosity).
    monkeypatch.setattr(evaluate.console, "setup", lambda distributed: None)
    monkeypatch.setattr(evaluate.flags, "FLAGS", types.SimpleNamespace(config=config, checkpoint=["unused"]))
    with pytest.raises(ConfigError, match="cannot run eval"):
        evaluate.main([])


# -- every key the code reads is declared ---------------------------------------------------------


@contextlib.contextmanager
def undeclared_reads():
    """Records every read of a key a ConfigDict does not have, whichever way it is made: attribute,
    item, `.get(key, default)` or `getattr(config, key, default)` (all go through `__getitem__`)."""
    misses = []
    getitem = ml_collections.ConfigDict.__getitem__

    def recording(self, key):
        try:
            return getitem(self, key)
        except KeyError:
            if not str(key).startswith("_"):  # dunder look-ups by copy, pickle, ...
                misses.append((key, sorted(self.keys())))
            raise

    with mock.patch.object(ml_collections.ConfigDict, "__getitem__", recording):
        yield misses


def test_undeclared_reads_are_recorded():
    """The recorder sees what a plain run would not: a `.get` or `getattr` with a default."""
    config = base_config()
    with undeclared_reads() as misses:
        assert config.judge.get("not_a_key", 7) == 7 and getattr(config.sft, "nor_this", 3) == 3
        assert config.judge.rows_per_chunk == 0
    assert [key for key, _ in misses] == ["not_a_key", "nor_this"]


def test_sft_and_grpo_read_only_declared_keys(tmp_path):
    """A tiny SFT run (train step, evaluation, HF export) and a tiny GRPO run (sampler, reference, judge
    in chunks, update, reward tables) on locked configs read no key that `base_config()` lacks."""
    config = valid_config()
    config.workdir = str(tmp_path)
    config.sft.subset = config.grpo.subset = "all"
    config.sft.max_steps = config.grpo.max_steps = 1
    config.sft.eval_max_samples, config.sft.eval_max_new_tokens, config.sft.eval_batch_size = 2, 4, 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.grpo.prompts_per_step, config.grpo.num_samples, config.grpo.max_new_tokens = 4, 2, 4
    config.judge.max_context_tokens, config.judge.max_response_tokens = 32, 8
    config.judge.rows_per_chunk = 4  # two chunks of two groups
    config.lock()
    with undeclared_reads() as misses:
        sft.run(config)
        train.run(config)
    assert not misses, f"undeclared config keys read (add them to config.base_config()): {misses}"
