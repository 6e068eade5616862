"""kardia_jax: Kardia-R1 (SFT + Rubric-as-Judge GRPO for emotional support) in JAX / Flax NNX."""

from kardia_jax import host_memory

__version__ = "0.1.0"

# Before JAX starts its CPU thread pool (see host_memory): later it would not reach the pool's threads.
KEEPS_FREED_MEMORY = host_memory.keep_freed_memory()
