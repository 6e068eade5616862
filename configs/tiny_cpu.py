"""The CPU demo: a ~1.1M-parameter Qwen2-style policy on the shipped sample and tokenizer.

    python -m kardia_jax.sft --config=configs/tiny_cpu.py
    python -m kardia_jax.train --config=configs/tiny_cpu.py

Runs in minutes on a 2-core laptop. SFT takes ~2.5 minutes there (4-7 on busy cores) and lifts the
test split's format-valid rate from 0 to ~0.9 and its emotion accuracy from 0 to ~0.4 (chance: 1/32),
mostly on the turns where the user names the feeling. There is no real judge to load offline, so a frozen copy
of the SFT policy reads the rubric: the pipeline is the real one, the rubric scores are not meaningful.
"""

from kardia_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny_cpu"
    c.model.preset = "tiny-kardia"
    c.model.scan_layers = False  # 4 layers: unrolled is faster on CPU and compiles in seconds
    c.mesh.fsdp = 1

    # SFT sequences (prompt + target): the system message, the last exchange and the reply fit in 320
    # tokens; older history is dropped. Targets are ~60 tokens, so 96 new tokens leave room at eval.
    c.data.max_length = 320

    # ~1000 updates of 4 sequences (20 epochs over the 198 train turns): 4-7 minutes on 2 busy cores.
    # Fewer updates leave the emotion near chance: copying the label from the context (the user names
    # it, earlier turns state it) forms only well after the train turns are memorized (240 updates of 8:
    # 0.09). Batches of 2 were too noisy for it (0.08); weight decay 0.1 helped one seed (0.27 -> 0.34).
    c.sft.subset = "all"  # the easy subset alone is 127 turns, and GRPO trains on the hard ones
    c.sft.learning_rate = 3e-3
    c.sft.warmup_ratio = 0.05
    c.sft.weight_decay = 0.1
    c.sft.global_batch_size = 4
    c.sft.num_epochs = 20
    c.sft.save_every = 100
    c.sft.log_every = 20
    c.sft.eval_max_new_tokens = 96
    c.sft.eval_batch_size = 64

    # GRPO: 64 steps of 4 hard prompts x G = 8 (~4 epochs of the 71 hard train turns, ~1 s a step here);
    # the judge reads a 128-token context.
    c.grpo.learning_rate = 2e-4
    c.grpo.prompts_per_step = 4
    c.grpo.num_samples = 8
    c.grpo.max_new_tokens = 96
    c.grpo.num_epochs = 4
    c.grpo.max_steps = 64
    c.grpo.save_every = 16
    c.grpo.print_samples_every = 16

    c.judge.from_policy = True
    c.judge.max_context_tokens = 128
    c.judge.max_response_tokens = 64
    return c
