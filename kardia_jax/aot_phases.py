"""The phases of `kardia_jax.aot`: each job phase of a config as its trainer's own jitted function on
abstract, sharded arguments of a full step's shapes, what else stays in HBM while it runs, and its model
FLOPs (the matmuls and attention our formulation computes; 3x for a backward, no rematerialization).

    phases = build_phases(config, mesh, policy_config, judge_config, {"sample", "update"})
    compiled = phases["update"].fn.trace(*phases["update"].args).lower().compile()
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kardia_jax import optim, sft, sharding
from kardia_jax import config_checks
from kardia_jax.grpo.steps import Rollout, Steps
from kardia_jax.models import loading, positions_from_mask
from kardia_jax.models.config import DTYPES, ModelConfig
from kardia_jax.models.tokenizer import load_tokenizer, tokenizer_path
from kardia_jax.rewards.judge import RubricJudge

GIB = 1 << 30


# -- model FLOPs ---------------------------------------------------------------------------------


def forward_flops(mc: ModelConfig, tokens: float, attended: float, logit_rows: float) -> float:
    """Matmul FLOPs of a forward over `tokens` positions, each attending `attended` positions on average,
    with the vocabulary projection on `logit_rows` of them (norms, rotary and softmax left out)."""
    d, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_token_layer = 2 * (d * (q + 2 * kv) + q * d + 3 * d * mc.intermediate_size) + 4 * q * attended
    return tokens * mc.num_layers * per_token_layer + logit_rows * 2 * d * mc.vocab_size


def completion_forward_flops(mc: ModelConfig, b: int, n: int, p: int, t: int) -> float:
    """`grpo.steps.completion_hidden` + logprobs: B prompts of P tokens once each (causal), N = B·G
    completions of T tokens after them, the vocabulary projection on the N·T completion positions."""
    return forward_flops(mc, b * p, (p + 1) / 2, 0) + forward_flops(mc, n * t, p + (t + 1) / 2, n * t)


def sample_flops(mc: ModelConfig, b: int, n: int, p: int, t: int) -> float:
    """Prefill of B prompts (logits of the last position), then N·T decode steps of one token each."""
    return forward_flops(mc, b * p, (p + 1) / 2, b) + forward_flops(mc, n * t, p + (t + 1) / 2, n * t)


def judge_flops(judge: RubricJudge, b: int, n: int) -> float:
    """The judge's three-level prefill (`rewards.judge`): HEAD once, the context block once per prompt
    (B), the response block once per completion (N), then the five criterion suffixes of each completion,
    read at their last positions."""
    mc, head = judge.model_config, len(judge.head_ids)
    context, response = judge.context_length, judge.response_length
    suffixes, width = judge.suffix_ids.shape
    return (forward_flops(mc, head, (head + 1) / 2, 0)
            + forward_flops(mc, b * context, head + (context + 1) / 2, 0)
            + forward_flops(mc, n * response, head + context + (response + 1) / 2, 0)
            + forward_flops(mc, n * suffixes * width, head + context + response + (width + 1) / 2, n * suffixes))


# -- the phases ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    """One jitted function with its abstract arguments, what else stays in HBM while it runs (bytes per
    chip), and its model FLOPs (whole mesh)."""

    fn: object
    args: tuple
    resident: int
    model_flops: float
    decode_span: int = 0  # the sampler: iterations of each decode loop (its cost counts them)
    prefill: object = None  # the sampler: (fn, args) of its prefill alone


def spec(shape, dtype, mesh, axes=None) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct sharded by logical `axes` (None: replicated)."""
    partition = (sharding.logical_to_spec(axes, shape, sharding.DEFAULT_RULES, dict(mesh.shape)) if axes
                 else PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))


def bytes_per_chip(tree) -> int:
    """HBM one chip holds for a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def architecture(section: ml_collections.ConfigDict, key: str) -> str:
    """The preset to compile for a config section (`model` or `judge`): its preset, else its architecture."""
    name = section.preset or section.architecture
    if not name:
        raise config_checks.ConfigError(
            f"{key}.architecture is empty: name the preset with the architecture of {key}.hf_path="
            f"{section.hf_path!r} (one of kardia_jax/models/config.py PRESETS, e.g. 'qwen2.5-7b') so that "
            "the compile needs no checkpoint.")
    return name


def build_phases(config: ml_collections.ConfigDict, mesh, policy: ModelConfig, judge_model: ModelConfig | None,
                 names, context_width: int = 0) -> dict[str, Phase]:
    """The phases `names` of `config` on `mesh`, for the policy and judge architectures given; the judge
    reads contexts of `context_width` tokens (0: judge.max_context_tokens, the widest bucket)."""
    g, s = config.grpo, config.sft
    rules = sharding.rules_from_config(config.rules)
    graphdef, params = loading.abstract_model(policy, mesh, rules)
    params = nnx.to_pure_dict(params)  # the trainers' representation (`scaffold.split_params`)
    optimizer = optim.make_optimizer(g.learning_rate, g.warmup_steps, 1000, g.weight_decay, g.grad_clip, g.mu_dtype)
    opt_shardings = optim.optimizer_shardings(optimizer, params)  # as `optim.init_optimizer` lays it out
    opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             jax.eval_shape(optimizer.init, params), opt_shardings)
    tokenizer = load_tokenizer(tokenizer_path())  # the real ones cannot be read here: prompts err long
    judge, judge_params = None, {}
    if judge_model is not None:
        judge_graphdef, judge_params = loading.abstract_model(judge_model, mesh,
                                                               sharding.rules_from_config(config.judge.rules))
        judge = RubricJudge.from_config(nnx.merge(judge_graphdef, judge_params), config.judge, tokenizer, tokenizer)
    compute = DTYPES[policy.dtype]
    reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding), params)
    held = {"policy": bytes_per_chip(params), "optimizer": bytes_per_chip(opt_state),
            "reference": bytes_per_chip(reference) if g.beta > 0 else 0, "judge": bytes_per_chip(judge_params)}
    others = lambda *names_: sum(v for k, v in held.items() if k not in names_)

    b, p, t = g.prompts_per_step, config.data.max_length, g.max_new_tokens
    n = b * g.num_samples
    batch = ("activation_batch", None)
    rows = lambda dtype: spec((n, t), dtype, mesh, batch)
    per_row = lambda dtype: spec((n,), dtype, mesh, ("activation_batch",))
    prompt, prompt_mask = spec((b, p), jnp.int32, mesh, batch), spec((b, p), jnp.int32, mesh, batch)
    phases = {}
    if "sft" in names:
        length, rows_sft = config.data.max_length, s.global_batch_size
        sft_optimizer = optim.make_optimizer(s.learning_rate, 0, 1000, s.weight_decay, s.grad_clip, s.mu_dtype)
        step = sft.make_train_step(graphdef, sft_optimizer, num_microbatches=s.grad_accum_steps,
                                   param_shardings=jax.tree.map(lambda x: x.sharding, params),
                                   opt_shardings=opt_shardings, chunk_size=s.logits_chunk_size, rules=rules)
        sft_batch = {k: spec((rows_sft, length), jnp.int32, mesh, batch)
                     for k in ("tokens", "positions", "input_mask", "loss_mask")}
        phases["sft"] = Phase(step, (params, opt_state, sft_batch), others("policy", "optimizer", "reference", "judge"),
                              3 * forward_flops(policy, rows_sft * length, (length + 1) / 2, rows_sft * length))
    steps = Steps(graphdef, params, judge, tokenizer, config, optimizer)
    rollout = Rollout(prompt, prompt_mask, rows(jnp.int32), rows(jnp.int32), per_row(bool), rows(jnp.float32),
                      rows(jnp.float32) if g.beta > 0 else None, per_row(jnp.float32))
    completion_args = (prompt, prompt_mask, rollout.completion, rollout.completion_mask)
    forward = completion_forward_flops(policy, b, n, p, t)
    if "sample" in names:
        prefill = jax.jit(lambda params_, tokens, mask: _prefill(graphdef, params_, tokens, mask))
        phases["sample"] = Phase(steps.sample, (params, prompt, prompt_mask, jax.random.key(0)),
                                 others("policy"), sample_flops(policy, b, n, p, t),
                                 decode_span=-(-t // max(1, steps.sampling.decode_segments)),
                                 prefill=(prefill, (params, prompt, prompt_mask)))
    if "old_logprobs" in names and g.recompute_old_logprobs:
        phases["old_logprobs"] = Phase(steps.logprobs, (params, *completion_args), others("policy"), forward)
    if "reference" in names and g.beta > 0:
        phases["reference"] = Phase(steps.logprobs, (reference, *completion_args), others("reference"), forward)
    if "score" in names and judge is not None:
        contexts = {k: spec((b, context_width or judge.max_context_tokens), jnp.int32, mesh, batch)
                    for k in ("context_ids", "context_mask")}
        phases["score"] = Phase(steps.score, (judge_params, rollout.completion, rollout.completion_mask,
                                              per_row(jnp.int32), contexts), others("judge"), judge_flops(judge, b, n))
    if "update" in names:
        phases["update"] = Phase(steps.update, (params, opt_state, rollout), others("policy", "optimizer"), 3 * forward)
    return phases


def _prefill(graphdef, params, tokens, mask):
    """The sampler's prefill alone (its logits at the last position), for the decode loop's accounting."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.prefill(tokens, positions_from_mask(mask), mask)
    return model.logits_from_hidden(hidden[:, -1:]), cache
