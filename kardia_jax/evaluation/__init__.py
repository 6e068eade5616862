"""The pieces of `python -m kardia_jax.evaluate` (the entry point is `kardia_jax/evaluate.py`).

    generation.py  one completion per prompt, batched and split over the mesh, scored as text
    judging.py     the rubric judge's 1-5 scores of finished completions, read or decoded
    stats.py       the figures of a checkpoint with their 95% intervals
    report.py      the printed table, eval.json and the radar chart
"""
