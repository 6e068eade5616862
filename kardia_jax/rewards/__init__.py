"""Rewards on token ids, computed in-graph: format, emotion, rubric judge, and their combination."""

from kardia_jax.rewards.combine import DEFAULT_WEIGHTS, RUBRIC_CRITERIA, active_components, rubric_reward, total_reward
from kardia_jax.rewards.emotion import build_label_table, emotion_reward
from kardia_jax.rewards.format import format_reward, whitespace_token_ids
from kardia_jax.rewards.judge import RubricJudge, load_judge

__all__ = [
    "DEFAULT_WEIGHTS",
    "RubricJudge",
    "RUBRIC_CRITERIA",
    "active_components",
    "build_label_table",
    "emotion_reward",
    "format_reward",
    "load_judge",
    "rubric_reward",
    "total_reward",
    "whitespace_token_ids",
]
