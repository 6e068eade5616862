"""Validation of a config for one entry point, before anything is loaded or compiled.

`validate(config, stage)` runs at the start of each entry point (`sft.run`, `train.run`,
`evaluate.main`) and raises one `ConfigError` listing every problem with the key(s) involved and how
to fix it: mesh sizes against the device count, batch sizes against the mesh's data x fsdp axes and the
accumulation splits, exactly one model (and judge) source, paths that must exist, the allowed values of
enum-like strings, reward weights, and sequence lengths against the policy's `max_position_embeddings`
(past it the rotary positions are out of range).

Where the lengths are checked: a preset's ModelConfig is known up front, so `validate` checks it; a
checkpoint's is known once it is loaded (hub ids and gs:// paths cannot be read cheaply here), so the
entry points call `check_policy_positions` on the loaded model, before anything compiles. The judge's
prompt length depends on its tokenizer and is checked where both are known, in `RubricJudge`.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections

from kardia_jax import sharding
from kardia_jax.data.pipeline import OVERLONG, SUBSETS
from kardia_jax.data.prompts import DIFFICULTY_RULES, HISTORY_MODES
from kardia_jax.data.sources import ON_BAD_ROW
from kardia_jax.grpo.loss import KL_ESTIMATORS, LOSS_AGGREGATIONS, REWARD_SCALINGS
from kardia_jax.models.config import DTYPES, PRESETS, REMAT_POLICIES, ModelConfig
from kardia_jax.rewards.combine import DEFAULT_WEIGHTS

STAGES = ("sft", "grpo", "eval")  # the entry points' uses of a config: sft.run, train.run, evaluate.main
JUDGE_MODES = ("read", "decoded", "both", "none")  # eval.judge_mode (kardia_jax/evaluate.py)
MU_DTYPES = ("float32", "bfloat16")  # sft.mu_dtype, grpo.mu_dtype: AdamW's first moment (optim.make_optimizer)


class ConfigError(ValueError):
    """A config that cannot run as it is; the message lists every problem with its key and fix."""


def validate(config: ml_collections.ConfigDict, stage: str, *, device_count: int | None = None) -> None:
    """Checks `config` for `stage` (one of STAGES) before anything is loaded or compiled.

    device_count: the devices the mesh spans (default `jax.device_count()`; for a TPU config checked
    elsewhere, the chip count of its topology). Raises ConfigError naming every offending key.
    """
    if stage not in STAGES:
        raise ValueError(f"validate: stage {stage!r}; use one of {STAGES}.")
    if device_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        device_count = jax.device_count()
    batch_devices, problems = _batch_devices(config, device_count)
    problems += _common_problems(config)
    problems += {"sft": _sft_problems, "grpo": _grpo_problems, "eval": _eval_problems}[stage](config, batch_devices)
    if config.model.preset in PRESETS and not config.model.hf_path:
        problems += _position_problems(config, stage, PRESETS[config.model.preset])
    if problems:
        raise ConfigError(f"The config cannot run {stage} ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))


def check_policy_positions(config: ml_collections.ConfigDict, stage: str, model_config: ModelConfig) -> None:
    """Raises ConfigError if `stage` reads the policy past its `max_position_embeddings` (for a model
    loaded from a checkpoint, whose ModelConfig `validate` could not know)."""
    problems = _position_problems(config, stage, model_config)
    if problems:
        raise ConfigError(problems[0])


def _position_problems(config, stage: str, model_config: ModelConfig) -> list[str]:
    data = config.data
    if stage == "grpo":
        length, keys = data.max_length + config.grpo.max_new_tokens, "data.max_length + grpo.max_new_tokens"
    else:  # SFT sequences and evaluation (prompt + eval_max_new_tokens, prompt + eval.max_new_tokens) fit data.max_length
        length, keys = data.max_length, "data.max_length"
    limit = model_config.max_position_embeddings
    if length <= limit:
        return []
    return [f"{keys} = {length} positions, past the policy's max_position_embeddings={limit} (its rotary "
            f"positions end there): lower {keys.replace(' + ', ' or ')}."]


def _one_of(key: str, value, allowed) -> list[str]:
    return [] if value in allowed else [f"{key}={value!r}: use one of {tuple(allowed)}."]


def _positive(config, *keys: str) -> list[str]:
    return [f"{key}={config[key]!r}: must be a positive integer." for key in keys
            if not isinstance(config[key], int) or config[key] < 1]


def _hub_id(path: str) -> bool:
    """`org/name`, which the loaders fetch from the Hugging Face hub when no such local path exists."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith(".")


def _path_problems(key: str, path: str, *, remote_prefixes: tuple[str, ...], hub: bool) -> list[str]:
    """A local path (not one of `remote_prefixes`, nor a hub id where `hub`) must exist."""
    if not path or path.startswith(remote_prefixes) or os.path.exists(path) or (hub and _hub_id(path)):
        return []
    return [f"{key}={path!r}: no such file or directory (relative paths start from {os.getcwd()!r}); fix the "
            f"path, or use {' / '.join(p + '…' for p in remote_prefixes)}{' or a hub id org/name' if hub else ''}."]


def _batch_devices(config, device_count: int) -> tuple[int | None, list[str]]:
    """data x fsdp of the mesh over `device_count` devices (None if the mesh does not resolve), and problems."""
    m = config.mesh
    try:
        sizes = sharding.mesh_sizes(m.data, m.fsdp, m.tensor, device_count)
    except ValueError as e:
        return None, [f"mesh.data, mesh.fsdp, mesh.tensor: {e}"]
    return sizes["data"] * sizes["fsdp"], []


def _source_problems(section: str, sources: dict[str, object]) -> list[str]:
    given = [key for key, value in sources.items() if value]
    if len(given) == 1:
        return []
    return [f"{section}: set exactly one of {', '.join(f'{section}.{k}' for k in sources)}; "
            f"got {given or 'none'}."]


def _common_problems(config) -> list[str]:
    model, data = config.model, config.data
    problems = _source_problems("model", {"preset": model.preset, "hf_path": model.hf_path})
    if model.preset:
        problems += _one_of("model.preset", model.preset, sorted(PRESETS))
    for key in ("model.architecture", "judge.architecture"):
        if config[key]:
            problems += _one_of(key, config[key], sorted(PRESETS))
    problems += _path_problems("model.hf_path", model.hf_path, remote_prefixes=("gs://",), hub=True)
    problems += _path_problems("tokenizer.path", config.tokenizer.path, remote_prefixes=("gs://",), hub=True)
    problems += _path_problems("data.source", data.source, remote_prefixes=("gs://", "hf://"), hub=False)
    for key in ("model.param_dtype", "model.dtype"):
        problems += _one_of(key, config[key], DTYPES)
    problems += _one_of("model.remat", model.remat, REMAT_POLICIES)
    problems += _one_of("data.on_bad_row", data.on_bad_row, ON_BAD_ROW)
    problems += _one_of("data.difficulty_rule", data.difficulty_rule, DIFFICULTY_RULES)
    problems += _one_of("data.history", data.history, HISTORY_MODES)
    problems += _one_of("data.overlong", data.overlong, OVERLONG)
    return problems + _positive(config, "data.max_length")


def _sft_eval_problems(config) -> list[str]:
    """SFT's greedy evaluation before and after training (sft.eval_*)."""
    sft = config.sft
    problems = _positive(config, "sft.eval_max_new_tokens", "sft.eval_batch_size")
    if not problems and sft.eval_max_new_tokens >= config.data.max_length:
        problems.append(f"sft.eval_max_new_tokens={sft.eval_max_new_tokens} leaves no prompt budget in "
                        f"data.max_length={config.data.max_length} (prompts get the difference): lower it or "
                        "raise data.max_length.")
    return problems


def _eval_problems(config, batch_devices: int | None) -> list[str]:
    """`python -m kardia_jax.evaluate` (eval.*, and the judge unless eval.judge_mode is "none")."""
    e = config.eval
    problems = _positive(config, "eval.max_new_tokens", "eval.batch_size", "eval.judge_decode_tokens")
    problems += _one_of("eval.judge_mode", e.judge_mode, JUDGE_MODES)
    if not isinstance(e.max_samples, int) or e.max_samples < 0:
        problems.append(f"eval.max_samples={e.max_samples!r}: must be an integer >= 0 (0: the whole test split).")
    if not (isinstance(e.temperature, (int, float)) and math.isfinite(e.temperature) and e.temperature >= 0):
        problems.append(f"eval.temperature={e.temperature!r}: must be >= 0 (0: greedy).")
    if problems:
        return problems
    if e.max_new_tokens >= config.data.max_length:
        problems.append(f"eval.max_new_tokens={e.max_new_tokens} leaves no prompt budget in data.max_length="
                        f"{config.data.max_length} (prompts get the difference): lower it or raise data.max_length.")
    if batch_devices and e.batch_size % batch_devices:
        problems.append(f"eval.batch_size={e.batch_size} must be a multiple of the {batch_devices} devices of the "
                        "mesh's data x fsdp axes (each batch's prompts are split over them): change it or mesh.*.")
    if e.judge_mode != "none":
        problems += _judge_problems(config, why=f"eval.judge_mode={e.judge_mode!r}")
    return problems


def _judge_problems(config, why: str) -> list[str]:
    """The judge section, when `why` (a key and its value) needs the judge."""
    j = config.judge
    sources = {"from_policy": j.from_policy, "preset": j.preset, "hf_path": j.hf_path}
    problems = [f"{p.rstrip('.')} ({why} needs the judge)." for p in _source_problems("judge", sources)]
    if j.preset:
        problems += _one_of("judge.preset", j.preset, sorted(PRESETS))
    for key in ("judge.param_dtype", "judge.dtype"):
        problems += _one_of(key, config[key], DTYPES)
    problems += _path_problems("judge.hf_path", j.hf_path, remote_prefixes=("gs://",), hub=True)
    problems += _path_problems("judge.tokenizer_path", j.tokenizer_path, remote_prefixes=("gs://",), hub=True)
    problems += _positive(config, "judge.max_context_tokens", "judge.max_response_tokens")
    if j.context_buckets < 1:
        problems.append(f"judge.context_buckets={j.context_buckets}: must be >= 1 (1: contexts at the full "
                        "judge.max_context_tokens).")
    if j.rows_per_chunk < 0:
        problems.append(f"judge.rows_per_chunk={j.rows_per_chunk}: must be >= 0 (0: no chunking).")
    return problems


def _sft_problems(config, batch_devices: int | None) -> list[str]:
    """batch_devices: data x fsdp (None: the mesh does not resolve, already a problem)."""
    sft = config.sft
    problems = _one_of("sft.subset", sft.subset, SUBSETS)
    problems += _one_of("sft.mu_dtype", sft.mu_dtype, MU_DTYPES)
    problems += _positive(config, "sft.global_batch_size", "sft.grad_accum_steps", "sft.log_every", "sft.save_every",
                          "sft.logits_chunk_size")
    if not problems and batch_devices and sft.global_batch_size % (sft.grad_accum_steps * batch_devices):
        problems.append(
            f"sft.global_batch_size={sft.global_batch_size} must be a multiple of sft.grad_accum_steps="
            f"{sft.grad_accum_steps} x the {batch_devices} devices of the mesh's data x fsdp axes (every microbatch "
            "splits evenly over the devices): change the batch size, the accumulation steps or mesh.*.")
    return problems + _sft_eval_problems(config)


def _grpo_problems(config, batch_devices: int | None) -> list[str]:
    """batch_devices: data x fsdp (None: the mesh does not resolve, already a problem)."""
    g = config.grpo
    problems = _one_of("grpo.subset", g.subset, SUBSETS)
    problems += _one_of("grpo.mu_dtype", g.mu_dtype, MU_DTYPES)
    problems += _one_of("grpo.kl_estimator", g.kl_estimator, KL_ESTIMATORS)
    problems += _one_of("grpo.loss_aggregation", g.loss_aggregation, LOSS_AGGREGATIONS)
    problems += _one_of("grpo.scale_rewards", g.scale_rewards, REWARD_SCALINGS)
    problems += _path_problems("grpo.init_from", g.init_from, remote_prefixes=("gs://",), hub=True)
    sizes = _positive(config, "grpo.prompts_per_step", "grpo.num_samples", "grpo.num_minibatches",
                      "grpo.num_iterations", "grpo.max_new_tokens", "grpo.logits_chunk_size", "grpo.log_every")
    problems += sizes
    if not sizes:
        if batch_devices and g.prompts_per_step % batch_devices:
            problems.append(
                f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of the {batch_devices} devices of the "
                "mesh's data x fsdp axes (the prompts, and so their B x grpo.num_samples completions, are split "
                "over them): change it or mesh.*.")
        if g.prompts_per_step % g.num_minibatches:
            problems.append(
                f"grpo.num_minibatches={g.num_minibatches} must divide grpo.prompts_per_step={g.prompts_per_step} "
                "(a minibatch holds whole groups: a prompt and its G samples).")
        if g.scale_rewards == "group" and g.num_samples < 2:
            problems.append("grpo.num_samples=1 with grpo.scale_rewards='group': a group's std needs G >= 2; raise "
                            "num_samples or set scale_rewards to 'batch' or 'none'.")

    weights = dict(g.reward_weights)
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        problems.append(f"grpo.reward_weights has unknown component(s) {unknown}: use {sorted(DEFAULT_WEIGHTS)}.")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        problems.append(f"grpo.reward_weights={weights}: weights are finite and >= 0 (0 switches a component "
                        "off), and at least one is > 0.")
    if g.reward_weights.rubric > 0:  # the judge is only loaded for a weighted rubric
        problems += _judge_problems(config, why=f"grpo.reward_weights.rubric={g.reward_weights.rubric}")
    return problems
