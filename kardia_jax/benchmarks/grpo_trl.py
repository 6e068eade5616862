"""The TRL side of the GRPO step benchmark (`kardia_jax.benchmarks.grpo`): TRL's `GRPOTrainer` on PyTorch
CPU, run for the benchmark's workload and timed by phase.

The prompts are token ids; a word-level tokenizer whose words map 1:1 to ids turns them into the text
TRL's dataset holds and back, so TRL's policy reads the same ids as kardia_jax's. The trainer's config
mirrors kardia_jax's (`common.BETA`, `LEARNING_RATE`, `GRAD_CLIP`, the "dapo" token-mean loss, group
scaling, exactly `new_tokens` new tokens); its phases are timed by wrapping `GRPOTrainer`'s methods.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time

import numpy as np

from kardia_jax.benchmarks.common import BETA, GRAD_CLIP, LEARNING_RATE, bench_extra, medians


def word_level_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` whose tokens are whitespace-separated words mapping 1:1 to ids:
    "<pad>" 0, "<eos>" 1, "<unk>" 2, then "t3".."t{vocab_size - 1}"."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def even_fraction_reward(completion_ids, **kwargs):
    """TRL reward function: the fraction of even token ids in each completion."""
    del kwargs
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def trl_grpo(hf_model, prompts: np.ndarray, *, num_samples: int, new_tokens: int, repeats: int = 3,
             warmup: int = 1, after_timed_step=None) -> tuple[dict[str, float], list[float]]:
    """Median step and phase times, and every timed step's time, of TRL's `GRPOTrainer` training `hf_model` (a
    transformers model, saved to a temporary directory: TRL loads its reference model from the policy's path) on
    `prompts` [B, P]. `after_timed_step()`, if given, runs after each timed step, outside its time."""
    import datasets
    import transformers

    with bench_extra():
        import torch
        import trl

    num_prompts = prompts.shape[0]
    vocab = hf_model.config.vocab_size
    tokenizer = word_level_tokenizer(vocab)
    texts = [" ".join(f"t{int(i)}" for i in row) for row in prompts]
    for text, row in zip(texts, prompts):
        if tokenizer(text)["input_ids"] != [int(i) for i in row]:
            raise AssertionError("the word-level tokenizer does not map the prompt text back to its ids")
    dataset = datasets.Dataset.from_dict({"prompt": texts})

    records: list[dict[str, float]] = []
    current: dict[str, float] = collections.defaultdict(float)
    lengths: list[int] = []

    class StepTimer(transformers.TrainerCallback):
        """Wall time of each optimizer step: on_step_begin (after the batch is fetched) to on_step_end."""

        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            current["step"] = time.perf_counter() - current.pop("start")
            records.append(dict(current))
            if after_timed_step is not None and len(records) > warmup:
                after_timed_step()

    def reward(completion_ids, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids)
        return even_fraction_reward(completion_ids, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "policy")
        hf_model.save_pretrained(model_dir)
        args = trl.GRPOConfig(
            output_dir=os.path.join(tmp, "out"),
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            max_steps=warmup + repeats,
            model_init_kwargs={"dtype": torch.float32},
            # one update per step on the whole generation batch of B x G completions
            per_device_train_batch_size=num_prompts * num_samples,
            gradient_accumulation_steps=1,
            num_generations=num_samples,
            num_iterations=1,
            # sampling: exactly new_tokens (min_new_tokens masks EOS), temperature 1, no top-k / top-p
            max_completion_length=new_tokens,
            generation_kwargs={"min_new_tokens": new_tokens},
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            # loss: the same GRPO objective as kardia_jax's config
            beta=BETA,
            epsilon=0.2,
            loss_type="dapo",
            scale_rewards="group",
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=GRAD_CLIP,
            optim="adamw_torch",
            # off: what kardia_jax does not do
            gradient_checkpointing=False,
            use_vllm=False,
            use_liger_kernel=False,
            cast_lm_head_to_fp32=False,
            log_completions=False,
            disable_dropout=True,
            torch_compile=False,
        )
        trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimer()])

        def timed(name, fn, when=None):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if when is None or when(*a, **k):
                        current[name] += time.perf_counter() - start

            return wrapper

        trainer._generate = timed("sample", trainer._generate)  # pylint: disable=protected-access
        trainer._get_per_token_logps_and_entropies = timed(  # pylint: disable=protected-access
            "reference", trainer._get_per_token_logps_and_entropies,  # pylint: disable=protected-access
            when=lambda model, *a, **k: model is trainer.ref_model)
        trainer._generate_and_score_completions = timed(  # pylint: disable=protected-access
            "rollout", trainer._generate_and_score_completions)  # pylint: disable=protected-access
        trainer.train()

    if len(records) != warmup + repeats:
        raise AssertionError(f"TRL ran {len(records)} steps, expected {warmup + repeats}")
    if set(lengths) != {new_tokens}:
        raise AssertionError(f"TRL completions have lengths {sorted(set(lengths))}, expected exactly {new_tokens}")
    for r in records:
        r["reward"] = r["rollout"] - r["sample"] - r["reference"]
        r["update"] = r["step"] - r["rollout"]
    return medians(records[warmup:]), [r["step"] for r in records[warmup:]]


def trl_version() -> str:
    with bench_extra():
        import trl

    return trl.__version__
