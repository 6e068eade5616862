"""GRPO, the algorithm (the run loop is `kardia_jax.train`):

    loss.py    group advantages, `GRPOConfig` and the clipped policy-gradient loss with its KL penalty
    steps.py   the jitted phases of one step (sample, logprobs, score, update) on a `Rollout`, and the
               reward wiring (`RewardSpec`: format, emotion and the rubric judge)
    report.py  what a run shows: the before/after reward table, console figures, plot panels, samples
"""
