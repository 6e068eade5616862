"""kardia_jax: Kardia-R1 (SFT + Rubric-as-Judge GRPO for emotional support) in JAX / Flax NNX."""

__version__ = "0.1.0"
