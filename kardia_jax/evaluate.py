"""Evaluation like the paper's table: Emotion accuracy and the five rubric scores per checkpoint.

    python -m kardia_jax.evaluate --config=configs/tiny_cpu.py \
        --checkpoint=sft=runs/tiny_cpu/sft/hf --checkpoint=grpo=runs/tiny_cpu/grpo/hf

Each `--checkpoint` is `[LABEL=]PATH`: a Hugging Face directory (e.g. `<workdir>/sft/hf`), an Orbax
checkpoint written by a trainer (its directory: the newest step; or one step's directory), or `base`
(the model `config.model` names, e.g. the pretrained backbone). For each, one completion per prompt
of `data.test_split` (the first `eval.max_samples`; greedy, or sampled at `eval.temperature`), then:

    Emotion accuracy (%)       the emotion span names the gold label (`evaluation/generation.py`)
    Relevance ... Safety (1-5) the rubric judge (`config.judge`) in `eval.judge_mode` (`evaluation/judging.py`:
                               read = training's scorer, decoded = the paper's protocol; both, or none)
    format-valid rate (%), mean completion length (tokens), truncation rate (%)

each with a 95% interval (Wilson for rates, normal for means: `evaluation/stats.py`) and the number of
samples. A completion without a response span scores 1 on every criterion; a decoded judge reply that
does not parse scores 1; both are counted. Prompts that do not fit `data.max_length - eval.max_new_tokens`
even with their history cut are left out and counted. With `judge.from_policy` the judge is a frozen
copy of GRPO's starting policy (the one GRPO trained against), the same for every checkpoint.

Outputs, under `eval.outdir` (default `<workdir>/eval`; local or gs://):

    eval.json               every figure of every checkpoint, with the settings
    radar.png               the six paper axes, one polygon per checkpoint (`evaluation/report.py`)
    <label>/samples.jsonl   one line per prompt: its id, the gold emotion, the four spans (or the raw
                            text), every score and, decoded, the judge's replies
    <label>/settings.json   what produced samples.jsonl

Resumable: samples.jsonl is rewritten (atomically) after every batch, and a rerun generates only the
prompts it lacks, when settings.json matches (else it stops and says what differs); greedy decoding
makes a resumed run's records those of an uninterrupted one (sampled, at eval.temperature > 0, the
prompts left over are drawn anew: same distribution, other draws). The batches are split over the mesh
like a training batch; every process runs the same loop, process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from kardia_jax import checkpoints, config_checks, console, sharding, storage
from kardia_jax.data.schema import TurnSample
from kardia_jax.evaluation import report, stats
from kardia_jax.evaluation.generation import Settings, generate_batches, score_text, test_samples
from kardia_jax.evaluation.judging import MODES, EvaluationJudge
from kardia_jax.models import Decoder, loading
from kardia_jax.models.tokenizer import Tokenizer, load_tokenizer, tokenizer_path
from kardia_jax.rewards.combine import RUBRIC_CRITERIA
from kardia_jax.rewards.judge import load_judge
from kardia_jax.spans import parse_spans


def sample_id(sample: TurnSample) -> str:
    """A prompt's id in samples.jsonl: its dialogue and turn."""
    return f"{sample.dialogue_id}#{sample.turn_index}"


def judge_modes(judge_mode: str) -> tuple[str, ...]:
    """eval.judge_mode -> the modes that run ("both": read and decoded; "none": none)."""
    return {"both": MODES, "none": ()}.get(judge_mode, (judge_mode,))


# -- loading -------------------------------------------------------------------------------------


def parse_checkpoint(arg: str) -> tuple[str, str]:
    """`[LABEL=]PATH` -> (label, path). Without a label: the path's last part that is not `hf` or a step
    number (`runs/x/sft/hf` -> sft, `runs/x/grpo/40` -> grpo-40), made safe as a directory name."""
    label, sep, path = arg.partition("=")
    if not sep or "/" in label or ":" in label:
        label, path = "", arg
    if not label:
        parts = [p for p in path.rstrip("/").split("/") if p]
        step = parts.pop() if parts and parts[-1].isdigit() else ""
        while parts and parts[-1] == "hf":
            parts.pop()
        label = "-".join(x for x in ((parts[-1] if parts else path), step) if x)
    return re.sub(r"[^\w.-]", "_", label), path


def load_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, mesh) -> tuple[Decoder, Tokenizer]:
    """The policy stored at `checkpoint`: a Hugging Face directory (config.json + safetensors, with its
    tokenizer files if any), an Orbax checkpoint written by a trainer (its root: the newest step; or one
    step's directory), read into the model `config.model` describes, or `base`: `config.model` itself."""
    if checkpoint == "base":
        return loading.load_policy(config, mesh)
    files = storage.listdir(checkpoint, key="--checkpoint") if storage.isdir(checkpoint) else []
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return loading.load_policy(loading.with_checkpoint(config, checkpoint), mesh)

    root, step = checkpoint.rstrip("/"), None
    if os.path.basename(root).isdigit():
        root, step = os.path.dirname(root), int(os.path.basename(root))
    model, tokenizer = loading.load_policy(config, mesh)
    graphdef, state = nnx.split(model)
    ckpt = checkpoints.Checkpointer(root, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"--checkpoint={checkpoint}: neither a Hugging Face directory (no config.json) "
                                    "nor an Orbax checkpoint directory (no complete step inside), nor 'base'.")
        restored = ckpt.restore(step, nnx.to_pure_dict(state))
    finally:
        ckpt.close()
    logging.info("Loaded step %d of %s.", step, root)
    return nnx.merge(graphdef, restored.params), tokenizer


def load_evaluation_judge(config: ml_collections.ConfigDict, mesh) -> EvaluationJudge | None:
    """The configured judge for evaluation (None when eval.judge_mode is "none"); a `from_policy` judge
    copies GRPO's starting policy."""
    if config.eval.judge_mode == "none":
        return None
    start = loading.grpo_start_config(config)
    if config.judge.from_policy:
        policy, tokenizer = loading.load_policy(start, mesh)
    else:  # only the tokenizer: the span markers and stop ids the completions hold
        policy, tokenizer = None, load_tokenizer(start.tokenizer.path or tokenizer_path(), key="tokenizer.path")
    judge, params = load_judge(config, mesh, tokenizer, policy)
    del policy
    return EvaluationJudge(judge, params, mesh, rows=config.eval.batch_size,
                           decode_tokens=config.eval.judge_decode_tokens)


# -- one checkpoint --------------------------------------------------------------------------------


def record(sample: TurnSample, text: str, length: int, truncated: bool) -> dict[str, Any]:
    """The samples.jsonl line of one completion, before the judge's scores."""
    scored = score_text(text, sample.emotion)
    return {"id": sample_id(sample), "row": sample.row, "difficulty": sample.difficulty,
            "gold_emotion": sample.emotion, "spans": parse_spans(text), "text": text,
            "format_valid": scored.format_valid, "emotion": scored.emotion, "emotion_correct": scored.emotion_correct,
            "completion_tokens": length, "truncated": truncated, "has_response": None, "scores": {}}


def _read_records(directory: str, settings: dict[str, Any], samples: Sequence[TurnSample]) -> dict[int, dict]:
    """The finished records of an earlier run in `directory` ({sample index: record}), or {} if none;
    raises when they were made with other settings. Read on process 0 only."""
    settings_path, samples_path = f"{directory}/settings.json", f"{directory}/samples.jsonl"
    if not storage.exists(settings_path):
        return {}
    before = json.loads(storage.read_text(settings_path))
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
        raise ValueError(
            f"{directory} holds an evaluation made with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
            "it cannot be resumed. Delete that directory, or write elsewhere with --config.eval.outdir=... or another label.")
    index = {sample_id(s): i for i, s in enumerate(samples)}
    lines = storage.read_text(samples_path).splitlines() if storage.exists(samples_path) else []
    found = {}
    for number, line in enumerate(lines, start=1):
        line_record = json.loads(line)
        if line_record["id"] not in index:
            raise ValueError(f"{samples_path}, line {number}: prompt {line_record['id']!r} is not among the "
                             f"{len(samples)} evaluated prompts; delete {directory} to start over.")
        found[index[line_record["id"]]] = line_record
    return found


def _done_mask(records: dict[int, dict], num_samples: int, error: Exception | None) -> np.ndarray:
    """[num_samples] bool: which prompts process 0's records hold, the same on every process. When process
    0 could not read them (`error`), every process raises, so that none waits for the others."""
    done = np.zeros(num_samples + 1, np.int32)  # the last entry: process 0 failed
    done[list(records)] = 1
    done[num_samples] = error is not None
    if jax.process_count() > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if error is not None:
        raise error
    if done[num_samples]:
        raise RuntimeError("Process 0 could not resume the evaluation; its log says why.")
    return done[:num_samples].astype(bool)


def evaluate_checkpoint(model: Decoder, tokenizer: Tokenizer, samples: Sequence[TurnSample], *, label: str,
                        directory: str, generation: Settings, judge: EvaluationJudge | None,
                        modes: Sequence[str], settings: dict[str, Any], mesh) -> list[dict[str, Any]]:
    """Generates, judges and records every prompt not yet in `directory`/samples.jsonl; returns every
    record of the checkpoint, in sample order (module docstring)."""
    primary = jax.process_index() == 0
    records, error = {}, None
    if primary:
        try:
            records = _read_records(directory, settings, samples)
        except ValueError as e:
            error = e
    done = _done_mask(records, len(samples), error)
    todo = [i for i in range(len(samples)) if not done[i]]
    if primary:
        storage.write_text(f"{directory}/settings.json", json.dumps(settings, indent=1))
        if records:
            logging.info("%s: resuming, %d of %d prompts already evaluated.", label, len(records), len(samples))
    bar = tqdm.tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"eval {label}", unit="prompt",
                    dynamic_ncols=True, disable=not primary)
    with bar:
        for batch in generate_batches(model, tokenizer, [samples[i] for i in todo], generation, mesh):
            indices = [todo[i] for i in batch.indices]
            rows = [record(samples[i], *fields) for i, fields in zip(indices, zip(batch.texts, batch.lengths, batch.truncated))]
            for mode in modes:
                scored = judge.score(mode, [samples[i] for i in indices], batch.texts)
                for r, row in enumerate(rows):
                    row["has_response"] = bool(scored.has_response[r])
                    row["scores"][mode] = {c: float(scored.scores[r, k]) for k, c in enumerate(RUBRIC_CRITERIA)}
                    if scored.parsed is not None:
                        row["parsed"] = {c: bool(scored.parsed[r, k]) for k, c in enumerate(RUBRIC_CRITERIA)}
                        row["judge_replies"] = dict(zip(RUBRIC_CRITERIA, scored.replies[r]))
            records.update(zip(indices, rows))
            if primary:
                storage.write_text(f"{directory}/samples.jsonl",
                                   "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
            bar.update(len(rows))
            accuracy = np.mean([records[i]["emotion_correct"] for i in records]) if records else 0.0
            bar.set_postfix_str(f"emotion acc {100 * accuracy:.1f}%")
    return [records[i] for i in sorted(records)]


# -- the job ---------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, checkpoint_args: Sequence[str]) -> dict[str, Any]:
    """Evaluates each `[LABEL=]PATH` of `checkpoint_args` (module docstring); prints the table on process 0 and
    returns {label: `stats.summarize` output, with "num_dropped"} (also in eval.json)."""
    config_checks.validate(config, "eval")
    e = config.eval
    labels = [parse_checkpoint(c) for c in checkpoint_args]
    if not labels:
        raise app.UsageError("Give at least one --checkpoint=[LABEL=]PATH (e.g. runs/tiny_cpu/sft/hf).")
    repeated = sorted({label for label, _ in labels if [x for x, _ in labels].count(label) > 1})
    if repeated:
        raise app.UsageError(f"Checkpoint labels {repeated} repeat: name them, --checkpoint=LABEL=PATH.")
    outdir = e.outdir or os.path.join(config.workdir, "eval")
    modes = judge_modes(e.judge_mode)
    generation = Settings(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                          max_prompt_len=config.data.max_length - e.max_new_tokens, temperature=e.temperature,
                          seed=config.seed)
    mesh = sharding.mesh_from_config(config.mesh)
    samples = test_samples(config, e.max_samples)
    results, correlations = {}, {}
    with jax.set_mesh(mesh):
        judge = load_evaluation_judge(config, mesh)
        for label, path in labels:
            model, tokenizer = load_checkpoint(config, path, mesh)
            config_checks.check_policy_positions(config, "eval", model.config)
            settings = {"checkpoint": path, "split": config.data.test_split, "num_prompts": len(samples),
                        **dataclasses.asdict(generation), "judge_modes": list(modes),
                        "judge_decode_tokens": e.judge_decode_tokens, "judge": _judge_source(config)}
            records = evaluate_checkpoint(model, tokenizer, samples, label=label, directory=f"{outdir}/{label}",
                                          generation=generation, judge=judge, modes=modes, settings=settings, mesh=mesh)
            del model
            results[label] = stats.summarize(records, modes) | {"num_dropped": len(samples) - len(records)}
            if len(modes) == 2:
                correlations[label] = stats.correlations(records, *MODES)
    if jax.process_index() == 0:
        _write_outputs(outdir, results, correlations, config, labels, modes)
    return results


def _judge_source(config: ml_collections.ConfigDict) -> str:
    j = config.judge
    if config.eval.judge_mode == "none":
        return "none"
    return "from_policy" if j.from_policy else (j.hf_path or f"preset {j.preset}")


def _write_outputs(outdir, results, correlations, config, labels, modes) -> None:
    """eval.json, radar.png and the printed table (process 0)."""
    paths = dict(labels)
    summary = {
        "split": config.data.test_split, "judge_modes": list(modes), "judge": _judge_source(config),
        "intervals": {"rates": "wilson", "means": "normal", "level": 0.95},
        "checkpoints": {label: {"path": paths[label], **stats.to_json(r), "read_vs_decoded_pearson":
                                stats.to_json(correlations.get(label))} for label, r in results.items()},
    }
    storage.write_text(f"{outdir}/eval.json", json.dumps(summary, indent=1))
    outputs = {"eval.json": f"{outdir}/eval.json"}
    mode = report.primary_mode(modes)
    if mode is not None:
        storage.write_bytes(f"{outdir}/radar.png", report.plot_radar(results, mode))
        outputs["radar chart"] = f"{outdir}/radar.png"
    outputs |= {f"{label} samples": f"{outdir}/{label}/samples.jsonl" for label in results}
    print()
    print(f"Evaluation on {config.data.test_split} (95% intervals: Wilson for %, normal for means):")
    print(report.format_table(results))
    notes = report.format_notes(results, correlations)
    if notes:
        print(notes)
    for label, r in results.items():
        if r["num_dropped"]:
            print(f"{label}: {r['num_dropped']} prompts did not fit data.max_length - eval.max_new_tokens and were left out")
    console.print_outputs("evaluate", outputs)


# -- command line --------------------------------------------------------------------------------

def _define_flags() -> None:
    """Command-line flags, defined only when this module is the program (so that importing it from
    another entry point, which defines its own --config, does not clash)."""
    config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py", "Config file (get_config()).")
    flags.DEFINE_multi_string("checkpoint", [], "[LABEL=]PATH: a HF directory, an Orbax checkpoint directory, "
                                                "or 'base' (config.model); repeat to compare.")


def main(argv):
    del argv
    config = flags.FLAGS.config
    console.setup(config.distributed)
    run(config, flags.FLAGS.checkpoint)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
