"""The CPU demo, README's main command: SFT, then GRPO with the rubric judge, a table of the reward
components of greedy completions on the test split before and after GRPO, and last the paper's table
(`kardia_jax.evaluate`) of the SFT and GRPO exports, with its radar chart.

    python -m kardia_jax.demo                                   # configs/tiny_cpu.py, shipped sample
    python -m kardia_jax.demo --config=configs/tiny_cpu.py --config.workdir=/tmp/demo

Every stage checkpoints under the workdir; rerunning resumes (a finished SFT is not repeated, an evaluated
prompt is not evaluated again). Each prints
a progress bar, a summary line every `sft.log_every` / `grpo.log_every` steps and, at its end, where its
checkpoints, export, metrics and plots are; `-v 1` (absl's --verbosity) shows the libraries' logs too.
"""

from __future__ import annotations

import os

from absl import app
from ml_collections import config_flags

from kardia_jax import console, evaluate, sft, train
from kardia_jax.grpo import report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")


def main(argv):
    del argv
    config = _CONFIG.value
    console.setup(config.distributed)
    sft_result = sft.run(config)
    result = train.run(config)
    print()
    print("SFT (test split, greedy):", ", ".join(f"{k} {v}" for k, v in sft_result.items() if isinstance(v, (int, float))))
    if result["after"] is None:
        print(f"GRPO stopped early at step {result['steps']} (preempted); rerun to resume.")
        return
    print(f"GRPO: {result['steps']} steps. Reward components of greedy test-split completions:")
    print(report.format_table(result["before"], result["after"]))
    # The paper's table. The rubric is read by a frozen copy of the SFT policy here: its scores show the
    # pipeline, not the quality of the answers.
    evaluate.run(config, [f"{stage}={os.path.join(config.workdir, stage, 'hf')}" for stage in ("sft", "grpo")])


if __name__ == "__main__":
    app.run(main)
