"""`python -m kardia_jax.aot`: a small config compiled for a small TPU topology with libtpu (so that a
change of shapes or shardings that breaks TPU compilation fails here), its loop accounting against the
loop-free program of the same size, and the architectures the TPU configs declare."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kardia_jax.config import load_file
from kardia_jax.config_checks import validate
from kardia_jax.models.config import HUB_ARCHITECTURES, PRESETS

TPU_CONFIGS = ("qwen3b_tpu", "qwen7b_tpu", "gemma2b_tpu", "gemma7b_tpu")
# The tiny CPU config on a 2x2 v5e slice: 4 chips of fsdp, every phase, the judge a copy of the policy.
SMALL = ["--config=configs/tiny_cpu.py", "--topology=v5e:2x2", "--config.mesh.fsdp=4"]


def _libtpu():
    if importlib.util.find_spec("libtpu") is None:  # the test extra installs it (jax[tpu])
        pytest.skip("libtpu is not importable (no wheel for this platform?): pip install -e '.[test]' installs jax[tpu]")


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_tpu_configs_declare_the_architecture_of_their_checkpoints(name):
    config = load_file(f"configs/{name}.py")
    assert config.model.architecture == HUB_ARCHITECTURES[config.model.hf_path]
    assert config.judge.architecture == HUB_ARCHITECTURES[config.judge.hf_path]
    assert set(HUB_ARCHITECTURES.values()) <= set(PRESETS)


def test_an_unknown_architecture_is_a_config_error():
    config = load_file("configs/qwen7b_tpu.py")
    config.model.architecture = "qwen2.5-7B"
    with pytest.raises(ValueError, match=r"model.architecture='qwen2.5-7B': use one of"):
        validate(config, "grpo", device_count=32)


def _aot(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kardia_jax.aot", *SMALL, *flags], capture_output=True, text=True,
                          env=env, timeout=900, check=False)


def test_a_small_config_compiles_for_tpu_and_reports_every_phase():
    _libtpu()
    run = _aot()
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for phase in ("sft", "sample", "score", "score@64", "update"):  # tiny_cpu: judge contexts of 64 or 128
        row = next((line for line in lines if line.split()[:1] == [phase]), None)
        assert row is not None and "peak" in row and "roofline" in row, run.stdout
    final = lines[-1]
    assert final.startswith("aot tiny_cpu: fits, peak "), final
    ratio = float(final.split("update flops ratio ")[1].split(",")[0])
    # Model FLOPs leave out norms, softmax and the optimizer, and the update of a 4-layer 128-wide model
    # is dominated by its matmuls: compiled / model stays near 1 (a lost loop trip would halve it).
    assert 0.95 < ratio < 1.6, final


def test_the_final_line_says_fits_only_when_every_phase_keeps_the_headroom():
    """`summary`, whose verdict is the exit status of `python -m kardia_jax.aot` (1: does not fit)."""
    from kardia_jax import aot  # pylint: disable=import-outside-toplevel

    chip = aot.chip_of("TPU v5 lite")
    gib = aot.GIB

    def report(name, temp_gib, flops=2e12):
        return aot.Report(name=name, compile_s=1.0, args=2 * gib, out=0, alias=0, temp=int(temp_gib * gib),
                          resident=gib, flops=flops, bytes=1e9, model_flops=1e12, chip=chip)

    small = [report("sample", 4.0), report("update", 10.0)]  # peaks 7 and 13 of 16 GiB: 18.75% free at worst
    line, fits = aot.summary("c", small, num_iterations=2, min_headroom=0.10)
    assert fits and line.startswith("aot c: fits, peak 13.0 GiB of 16 GiB per chip (19% headroom, update), "
                                    "update flops ratio 2.00, roofline step"), line
    assert not aot.summary("c", small, num_iterations=2, min_headroom=0.20)[1]
    line, fits = aot.summary("c", small + [report("score", 12.0)], num_iterations=2, min_headroom=0.10)
    assert not fits and line.startswith("aot c: does not fit, peak 15.0 GiB of 16 GiB per chip (6% headroom, score)")


def test_loop_accounting_equals_the_loop_free_program():
    """counted_cost on the scanned, minibatched, chunked update (2 minibatches, 3 logit chunks, 4 scanned
    layers) counts the FLOPs XLA counts on the same update compiled without any loop at full size."""
    _libtpu()
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    from kardia_jax import aot, sharding  # pylint: disable=import-outside-toplevel
    from kardia_jax.models.config import preset  # pylint: disable=import-outside-toplevel

    config = load_file("configs/tiny_cpu.py")
    config.mesh.fsdp = 4
    config.grpo.prompts_per_step, config.grpo.num_minibatches, config.grpo.logits_chunk_size = 8, 2, 32
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = sharding.make_mesh(1, 4, 1, devices=devices)
    policy = preset("tiny-kardia", scan_layers=True)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        counted = aot.counted_cost(config, mesh, policy, None, "update")
        flat_config = load_file("configs/tiny_cpu.py")
        flat_config.mesh.fsdp = 4
        flat_config.grpo.prompts_per_step, flat_config.grpo.num_minibatches = 8, 1
        flat_config.grpo.logits_chunk_size = flat_config.grpo.max_new_tokens
        flat = aot.measured_cost(flat_config, mesh, policy.replace(scan_layers=False), None, "update")
        scanned = aot.measured_cost(config, mesh, policy, None, "update")  # as XLA counts it: bodies once
    np.testing.assert_allclose(counted[0], flat[0], rtol=0.03)  # FLOPs
    assert scanned[0] < 0.6 * flat[0]  # what the accounting corrects: one layer of four, one part of two
    # Bytes: the loop-free program reads the weights once where the real one reads them per minibatch.
    assert flat[1] * 0.9 < counted[1] < flat[1] * 2.5
