"""The default configuration every config file starts from (big_vision style: configs are data).

A config file in configs/ defines `get_config()`, calls `base_config()` and overrides what differs.
Entry points read the config once, at start-up; `--config.key=value` overrides any field.

Sections: model / tokenizer (what to load), mesh + rules (how to shard), data (where the dialogues are
and how to batch them), sft, grpo (the two trainers), judge (the rubric judge of the GRPO reward), eval
(`python -m kardia_jax.evaluate`).

`base_config()` is the schema: every key the code reads is declared there, with a comment, and the code
reads keys directly (never `.get` with a default), so a misspelt `--config.section.key` is rejected and
a key the code needs cannot go missing unnoticed. `kardia_jax.config_checks.validate` checks a config
for one entry point before anything is loaded.
"""

from __future__ import annotations

import importlib.util

import ml_collections

from kardia_jax import sharding
from kardia_jax.models.config import HUB_ARCHITECTURES
from kardia_jax.rewards.combine import DEFAULT_WEIGHTS


def load_file(path: str) -> ml_collections.ConfigDict:
    """The config of a config file (its `get_config()`), as `--config=path` gives it to an entry point."""
    spec = importlib.util.spec_from_file_location(f"kardia_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a Python config file (configs/*.py).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _rules_dict(rules) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({name: axes for name, axes in rules})


def base_config() -> ml_collections.ConfigDict:
    """Every key the code reads, with its default (the schema: see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, sampling
    c.workdir = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard, plots (local path or gs://)
    # A TPU topology (e.g. "v5e:4x4") the config is meant for; `python -m kardia_jax.aot` compiles
    # against it on a CPU machine. Empty for configs that run where they are.
    c.topology = ""
    # Multi-host TPU slices: join jax.distributed before anything else (every host runs the same command).
    c.distributed = False

    # What to load. Exactly one of preset (random init) / hf_path (HF checkpoint: local dir, gs:// or hub id).
    c.model = ml_collections.ConfigDict()
    c.model.preset = ""  # a name in kardia_jax/models/config.py PRESETS
    c.model.hf_path = ""
    # The preset with model.hf_path's architecture (e.g. "qwen2.5-7b"): what `python -m kardia_jax.aot`
    # compiles without the checkpoint. paper_tpu_config sets it from models.config.HUB_ARCHITECTURES.
    c.model.architecture = ""
    c.model.param_dtype = "float32"  # parameter (master) dtype: float32 or bfloat16
    c.model.dtype = "float32"  # activation / matmul dtype; also the frozen reference's storage dtype
    c.model.remat = "none"  # a layer's rematerialization policy: none, full, dots, dots_no_batch
    c.model.scan_layers = True  # False unrolls the layers of training forwards: faster for a few layers on CPU
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # empty: the shipped kardia_jax/assets/tokenizer; or a local dir, gs:// or hub id

    # Mesh sizes (one may be -1: all remaining devices) and logical-axis rules of the policy.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.rules = _rules_dict(sharding.DEFAULT_RULES)  # logical axis name -> mesh axes (kardia_jax/sharding.py)

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # empty: the shipped sample; or a JSONL/Parquet file or dir, gs://…, hf://Jhcircle/KardiaBench
    c.data.train_split = "train"
    c.data.test_split = "test"  # evaluation (SFT before/after, GRPO reward tables, kardia_jax.evaluate)
    c.data.on_bad_row = "raise"  # or "skip" (skipped rows are counted and reported)
    c.data.difficulty_rule = "emotion_word"  # used when rows carry no `difficulty` field; or "turn_index"
    # Earlier assistant turns in a prompt: "response" (their response span only), "no_emotion" (without
    # the emotion span) or "full" (all four spans). A dialogue has one label, so "full" shows it to every
    # later turn (35 of the shipped sample's 71 hard train turns), and so does "no_emotion" through the
    # reasoning span; `python -m kardia_jax.data.prompts` counts it (kardia_jax/data/prompts.py).
    c.data.history = "response"
    c.data.max_length = 1024  # SFT: whole sequence; GRPO: prompt
    c.data.overlong = "truncate"  # a prompt over budget loses its oldest exchanges; "drop": left out
    c.data.worker_count = 0  # Grain worker processes (0: in the main process)

    # Supervised fine-tuning (cold start): the paper's settings.
    c.sft = ml_collections.ConfigDict()
    c.sft.subset = "easy"  # easy, hard or all
    c.sft.learning_rate = 1e-4  # AdamW peak, after linear warm-up, cosine decay to 0
    c.sft.warmup_ratio = 0.03  # of the total steps
    c.sft.weight_decay = 0.0  # on matrices, not norms and biases
    c.sft.grad_clip = 1.0  # global-norm clipping (0: none)
    c.sft.mu_dtype = "float32"  # AdamW's first moment: float32 or bfloat16 (half its HBM; the second stays float32)
    c.sft.global_batch_size = 128  # sequences per update, over all processes
    c.sft.grad_accum_steps = 1  # microbatches per update (a lax.scan inside the step)
    c.sft.num_epochs = 2
    c.sft.save_every = 200  # checkpoint every N steps (and at the end, and on SIGTERM)
    c.sft.max_to_keep = 3  # checkpoints kept
    c.sft.max_steps = 0  # 0: num_epochs over the subset
    # An update whose loss, gradients or updates are not finite is skipped (params and optimizer state
    # unchanged) and counted; this many in a row stop the run with an error (>= 1).
    c.sft.max_consecutive_nonfinite = 10
    c.sft.log_every = 10  # metrics every N steps (and at the last)
    # Sequence positions per chunk of the vocab projection in the loss: a chunk's [rows, chunk, V]
    # float32 logits are the loss's largest temporary.
    c.sft.logits_chunk_size = 256
    c.sft.eval_max_new_tokens = 256  # SFT's greedy evaluation before/after: the prompt gets the rest of data.max_length
    c.sft.eval_batch_size = 32  # prompts per sampler call (split over the mesh like eval.batch_size, where it divides)
    c.sft.eval_max_samples = 0  # 0: the whole test split

    # GRPO with the rubric judge: the paper's settings; KL/clip/lengths/temperature are our defaults.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.subset = "hard"  # easy, hard or all
    c.grpo.init_from = ""  # empty: the SFT checkpoint under workdir/sft (else model.*); or a HF dir
    c.grpo.learning_rate = 1e-6  # AdamW peak, after linear warm-up, cosine decay to 0
    c.grpo.warmup_steps = 0  # in rollout steps; the schedule counts updates (num_iterations per step)
    c.grpo.weight_decay = 0.0
    c.grpo.grad_clip = 1.0  # global-norm clipping (0: none)
    c.grpo.mu_dtype = "float32"  # AdamW's first moment: float32 or bfloat16 (half its HBM; the second stays float32)
    c.grpo.prompts_per_step = 32  # B, over all processes
    c.grpo.num_samples = 8  # G
    c.grpo.num_epochs = 2
    c.grpo.num_iterations = 1  # mu: policy updates per batch of rollouts
    # Old logprobs come from the sampler (same numerics as the trainer's forward in float32); True
    # recomputes them with a teacher-forced forward (worth it when sampling runs in lower precision).
    c.grpo.recompute_old_logprobs = False
    c.grpo.num_minibatches = 1  # gradient accumulation inside one update (each part holds whole groups)
    # Completion positions per chunk of the vocab projection (reference logprobs and the update's fused
    # loss): a chunk's [rows, chunk, V] float32 logits are the largest temporary of those passes.
    c.grpo.logits_chunk_size = 32
    c.grpo.max_new_tokens = 256  # completion length T
    c.grpo.temperature = 1.0  # sampling (0: greedy)
    c.grpo.top_k = 0  # 0: off
    c.grpo.top_p = 1.0  # 1: off
    c.grpo.beta = 0.04  # KL coefficient (0: no reference model)
    c.grpo.kl_estimator = "k3"  # k1, k2 or k3 (kardia_jax/grpo/loss.py)
    c.grpo.epsilon_low = 0.2  # clip range of the ratio: [1 - low, 1 + high]
    c.grpo.epsilon_high = 0.2
    c.grpo.loss_aggregation = "token_mean"  # token_mean, seq_mean_token_mean or dr_grpo
    c.grpo.scale_rewards = "group"  # advantages divided by the group's std, the batch's ("batch") or not ("none")
    c.grpo.mask_truncated_completions = False  # True: completions cut at max_new_tokens get no loss
    # r = sum of weight x component (rewards/combine.py); a component of weight 0 is neither computed
    # nor logged (rubric=0: no judge is loaded).
    c.grpo.reward_weights = ml_collections.ConfigDict(DEFAULT_WEIGHTS)
    c.grpo.save_every = 20  # checkpoint every N steps (and at the end, and on SIGTERM)
    c.grpo.max_to_keep = 3
    c.grpo.print_samples_every = 10  # log two decoded completions every N steps (0: never)
    # A summary line on the console every N steps (and at the last); metrics.jsonl and TensorBoard get
    # every step regardless.
    c.grpo.log_every = 10
    c.grpo.max_steps = 0  # 0: num_epochs over the subset
    c.grpo.eval_max_samples = 0  # test-split prompts of the before/after reward table; 0: all
    # Non-finite updates in a row (each skipped, params and optimizer state unchanged) that stop the run
    # with an error (>= 1); counted in updates, num_iterations per step, checked after each step.
    c.grpo.max_consecutive_nonfinite = 10

    # The rubric judge: its own model and its own sharding rules (frozen: shard for memory).
    # Exactly one source when grpo.reward_weights.rubric > 0: from_policy, preset or hf_path.
    c.judge = ml_collections.ConfigDict()
    c.judge.from_policy = False  # True: a frozen copy of the initial policy reads the rubric (CPU demo)
    c.judge.preset = ""  # random init (tests, benchmarks)
    c.judge.hf_path = ""  # a HF checkpoint: local dir, hub id or gs://
    c.judge.architecture = ""  # the preset with judge.hf_path's architecture (as model.architecture)
    c.judge.tokenizer_path = ""  # empty: hf_path's own tokenizer, else the policy's
    c.judge.param_dtype = "float32"
    c.judge.dtype = "float32"
    c.judge.rules = _rules_dict(sharding.DEFAULT_RULES)
    c.judge.max_context_tokens = 512  # persona + dialogue context budget inside the judge prompt
    c.judge.max_response_tokens = 256  # the response span's budget
    # Completions the judge scores at a time (chunks of whole groups) to bound its prefills' memory;
    # 0: all of a step's at once.
    c.judge.rows_per_chunk = 0
    # A batch's judge contexts are read at the narrowest of this many widths (max_context_tokens / 2^k,
    # k < context_buckets) that holds its longest: short contexts do not pay for the full budget, at the
    # cost of one more compiled judge program per width. 1: always the full width.
    c.judge.context_buckets = 3

    # `python -m kardia_jax.evaluate`: one completion per test-split prompt, scored like the paper's table
    # (emotion accuracy, the five rubric criteria on 1-5, with 95% intervals; kardia_jax/evaluate.py).
    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 256  # the prompt gets the rest of data.max_length
    c.eval.batch_size = 32  # prompts per sampler call, split over the mesh's data x fsdp devices
    c.eval.max_samples = 0  # the first N prompts of data.test_split; 0: all
    c.eval.temperature = 0.0  # 0: greedy; > 0: sampled (seed: config.seed)
    # How the judge (config.judge) scores: "read" (its expected score over "1".."5", training's scorer),
    # "decoded" (it writes its answer, which is parsed: the paper's protocol), "both", or "none".
    c.eval.judge_mode = "read"
    c.eval.judge_decode_tokens = 4  # decoded: new tokens of each judge reply (the score is its first)
    c.eval.outdir = ""  # eval.json, radar.png and per checkpoint samples.jsonl; empty: <workdir>/eval
    return c


def paper_tpu_config(*, policy: str, topology: str, workdir: str, judge: str = "Qwen/Qwen3-8B",
                     tensor: int = 1) -> ml_collections.ConfigDict:
    """The paper's SFT and GRPO settings for a real backbone on a TPU slice.

    policy / judge: HF checkpoints (hub id, local dir or gs://). Parameters are float32 masters with
    bfloat16 compute; the frozen judge and reference are stored in bfloat16. FSDP over the chips, times
    `tensor`-way tensor parallelism: the sampler gathers a layer's weights over the fsdp axis only, so
    tensor > 1 divides the gathered bf16 weights (a 7B policy's are ~14 GiB) by `tensor`.
    Check a config against its topology with `python -m kardia_jax.aot --config=...`.
    """
    c = base_config()
    c.workdir = workdir
    c.topology = topology
    c.mesh.tensor = tensor
    c.distributed = True
    c.model.hf_path = policy
    c.model.architecture = HUB_ARCHITECTURES.get(policy, "")
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tokenizer.path = policy
    c.data.source = "hf://Jhcircle/KardiaBench"
    c.data.max_length = 2048
    c.data.worker_count = 4
    # SFT: easy subset, AdamW lr 1e-4, global batch 128, 2 epochs (paper), in 8 microbatches: 128 x 2048
    # tokens at once need 17 GiB of temporaries per chip for gemma-2b on v5e-8 (python -m kardia_jax.aot),
    # 16 at a time 8.1 GiB (peak 11.6 of 16).
    c.sft.grad_accum_steps = 8
    c.sft.eval_max_new_tokens = 512
    c.sft.eval_batch_size = 64
    c.eval.max_new_tokens = 512
    c.eval.batch_size = 64
    # GRPO: hard subset, lr 1e-6, 32 prompts x G = 8, 2 epochs (paper); beta 0.04 (k3), eps 0.2 (ours).
    c.grpo.max_new_tokens = 512
    # 8 minibatches of 4 prompts x 8 samples: with 4, the update of gemma-2b on v5e-8 needs 25.6 GiB of
    # temporaries per chip at 2048-token prompts; with 8, 7.3 GiB (python -m kardia_jax.aot).
    c.grpo.num_minibatches = 8
    # bf16 sampling: the sampler's logprobs drift from the trainer's (python -m
    # kardia_jax.benchmarks.logprob_drift, bench-tiny, 1024 tokens: |delta| mean 1.4e-3, max 7.1e-3, ratio
    # std 1.7e-3 in [0.9946, 1.0071]; float32: max 1.9e-6). Small at 4 layers but it grows with depth and
    # length and biases the clipped ratio, so the old logprobs are recomputed (one more forward per step).
    c.grpo.recompute_old_logprobs = c.model.dtype == "bfloat16"
    c.grpo.save_every = 50
    c.judge.hf_path = judge
    c.judge.architecture = HUB_ARCHITECTURES.get(judge, "")
    c.judge.param_dtype = "bfloat16"
    c.judge.dtype = "bfloat16"
    c.judge.max_context_tokens = 1536
    c.judge.max_response_tokens = 512
    return c
