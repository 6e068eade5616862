"""kardia_jax keeps freed host memory on CPU: a program's second run does not page-fault its buffers in again."""

import os
import platform
import statistics
import subprocess
import sys

import pytest

from kardia_jax import host_memory

# Runs the gradient of an MLP on 8192 tokens (136 MiB of temporaries) ten times in a fresh process and prints the
# minor page faults of each run.
SCRIPT = """
import resource
import kardia_jax
import jax, jax.numpy as jnp
loss = lambda w, x: jnp.sum(jax.nn.silu(x @ w[0]) @ w[1])
grad = jax.jit(jax.grad(loss))
x, w = jnp.ones((8192, 256)), (jnp.full((256, 1024), 0.01), jnp.full((1024, 256), 0.01))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad(w, x)[0].block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kardia_jax.KEEPS_FREED_MEMORY, *faults)
"""


def _run_faults(setting: str) -> tuple[str, list[int]]:
    # One real CPU device, as a CPU run has: the 8 simulated devices of conftest's XLA_FLAGS get buffers
    # some other way, which this setting does not reach.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", host_memory.ENV: setting}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    kept, kept_faults = _run_faults("1")
    default, default_faults = _run_faults("0")
    assert (kept, default) == ("True", "False")
    pages = 2**20 // os.sysconf("SC_PAGE_SIZE")  # per MiB
    # After the first run: glibc's defaults hand the buffers back and fault them in again every time; kept,
    # most runs reuse them (a run whose buffers do not fit the freed space, as fragmented, grows the heap).
    if statistics.median(default_faults[1:]) < 64 * pages:
        pytest.skip(f"this machine does not fault the buffers in again under glibc's defaults ({default_faults}; "
                    "e.g. transparent huge pages set to 'always'): nothing to compare")
    assert statistics.median(kept_faults[1:]) < 4 * pages


def test_setting_is_validated_and_accelerators_are_left_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match="KARDIA_KEEP_FREED_MEMORY='yes'"):
        host_memory.keep_freed_memory()
    monkeypatch.delenv(host_memory.ENV)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not host_memory.cpu_only()
    assert not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_only()
