"""Typed records for KardiaBench and validation of raw rows.

A KardiaBench row (one line of `train.jsonl` / `test.jsonl`) is one dialogue:

  person         str   raw profile text (MBTI, About, Signature, Recent Activities)
  mbti           str   e.g. "INFJ"
  emotion        str   one of the 32 EmpatheticDialogues labels (case/whitespace-insensitive)
  situation      str   what happened to the person
  anon_username  str
  messages       list of {"role", "content"}: one system message, then user/assistant alternating,
                 starting with user; every assistant message carries the four spans
  difficulty     optional str, "easy" or "hard" (not in KardiaBench; a source may add it)

`parse_dialogue` turns a raw row into a `Dialogue` or raises `DataError` naming the file, the row, the
field and how to fix it. Assistant messages are stored normalized to the canonical
`<|understanding_begin|>…<|response_end|>` marker text, whichever tag style the row used.

A `TurnSample` is one training example: the prompt before one assistant turn and that turn as target.
`kardia_jax.data.prompts.expand_dialogue` builds them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from kardia_jax.spans import EMOTIONS, join_spans, normalize_emotion, parse_spans

REQUIRED_STR_FIELDS = ("person", "mbti", "emotion", "situation", "anon_username")
DIFFICULTIES = ("easy", "hard")

# Why a row was rejected; `DataError.reason` takes one of these, and skip-mode statistics count by it.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_JSON = "bad_json"
BAD_SPANS = "bad_spans"
UNKNOWN_EMOTION = "unknown_emotion"
ROLE_ORDER = "role_order"
BAD_VALUE = "bad_value"


class DataError(ValueError):
    """A raw row that cannot be used, with where it is and how to fix it.

    Attributes:
      path: the file (or dataset) the row came from.
      row: 1-based row number (the line number for JSONL).
      field: the offending field, e.g. "emotion" or "messages[3].content".
      reason: one of the reason constants of this module (used to count skipped rows).
    """

    def __init__(self, path: str, row: int, field: str, reason: str, problem: str, fix: str):
        self.path, self.row, self.field, self.reason = path, row, field, reason
        super().__init__(f"{path}, row {row}, field '{field}': {problem} Fix: {fix}")


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """One validated KardiaBench dialogue.

    `messages` are {"role", "content"} dicts: system first, then user/assistant alternating; assistant
    contents are canonical marker text (see `join_spans`). `emotion` is the normalized label.
    """

    dialogue_id: str
    source: str
    row: int
    person: str
    mbti: str
    emotion: str
    situation: str
    anon_username: str
    messages: tuple[dict[str, str], ...]
    difficulty: str | None = None


@dataclasses.dataclass(frozen=True)
class TurnSample:
    """One assistant turn of a dialogue as a training example.

    `prompt` is the system message plus every message before the turn (it ends with a user message);
    `target` is the assistant turn in canonical marker text; `emotion` the gold label; `difficulty`
    is "easy" or "hard" (from the row, or from the rule in `kardia_jax.data.prompts`).
    """

    dialogue_id: str
    row: int
    turn_index: int  # 0 for the first assistant turn of the dialogue
    prompt: tuple[dict[str, str], ...]
    target: str
    emotion: str
    persona: str
    situation: str
    mbti: str
    difficulty: str


def parse_dialogue(raw: Any, *, path: str, row: int, dialogue_id: str | None = None) -> Dialogue:
    """Validates one raw row and returns it as a `Dialogue`.

    Args:
      raw: the decoded row (a dict).
      path: where the row came from, for error messages.
      row: 1-based row number, for error messages.
      dialogue_id: the id to give the dialogue; defaults to "<path>:<row>".

    Raises:
      DataError: on a missing field, a field of the wrong type, an unknown emotion, roles out of
        order, an assistant message without the four well-formed spans, or a bad `difficulty`.
    """

    def error(field: str, reason: str, problem: str, fix: str) -> DataError:
        return DataError(path, row, field, reason, problem, fix)

    if not isinstance(raw, dict):
        raise error("<row>", WRONG_TYPE, f"the row is a {type(raw).__name__}, not an object.",
                    "each row must be a JSON object with the KardiaBench fields.")
    for field in (*REQUIRED_STR_FIELDS, "messages"):
        if field not in raw or raw[field] is None:
            raise error(field, MISSING_FIELD, "the field is missing.",
                        f"add '{field}' to the row (required fields: {', '.join(REQUIRED_STR_FIELDS)}, messages).")
    for field in REQUIRED_STR_FIELDS:
        if not isinstance(raw[field], str):
            raise error(field, WRONG_TYPE, f"expected a string, got {type(raw[field]).__name__}.",
                        f"store '{field}' as text.")

    emotion = normalize_emotion(raw["emotion"])
    if emotion not in EMOTIONS:
        close = difflib.get_close_matches(emotion, EMOTIONS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise error("emotion", UNKNOWN_EMOTION, f"'{raw['emotion']}' is not one of the 32 emotion labels.{hint}",
                    "use one of kardia_jax.spans.EMOTIONS.")

    difficulty = raw.get("difficulty")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise error("difficulty", BAD_VALUE, f"'{difficulty}' is neither 'easy' nor 'hard'.",
                    "set it to 'easy' or 'hard', or drop the field to let the difficulty rule decide.")

    messages = _parse_messages(raw["messages"], error)
    return Dialogue(
        dialogue_id=dialogue_id if dialogue_id is not None else f"{path}:{row}",
        source=path,
        row=row,
        person=raw["person"],
        mbti=raw["mbti"].strip(),
        emotion=emotion,
        situation=raw["situation"],
        anon_username=raw["anon_username"],
        messages=messages,
        difficulty=difficulty,
    )


def _parse_messages(raw_messages: Any, error) -> tuple[dict[str, str], ...]:
    """Checks types, role order and spans; returns messages with canonical assistant text."""
    if not isinstance(raw_messages, (list, tuple)):
        raise error("messages", WRONG_TYPE, f"expected a list, got {type(raw_messages).__name__}.",
                    "store messages as a list of {role, content} objects.")
    messages = []
    for i, message in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise error(where, WRONG_TYPE, f"expected an object, got {type(message).__name__}.",
                        "each message must be {\"role\": ..., \"content\": ...}.")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise error(f"{where}.{key}", MISSING_FIELD, "the key is missing.",
                            "each message needs both 'role' and 'content'.")
            if not isinstance(message[key], str):
                raise error(f"{where}.{key}", WRONG_TYPE, f"expected a string, got {type(message[key]).__name__}.",
                            f"store the message {key} as text.")
        expected = "system" if i == 0 else ("user" if i % 2 == 1 else "assistant")
        if message["role"] != expected:
            raise error(f"{where}.role", ROLE_ORDER, f"expected role '{expected}', got '{message['role']}'.",
                        "messages must be one system message, then user and assistant alternating, user first.")
        content = message["content"]
        if expected == "assistant":
            spans = parse_spans(content)
            if spans is None:
                raise error(f"{where}.content", BAD_SPANS,
                            "the assistant turn does not hold the four spans (understanding, reasoning, emotion, "
                            "response) each exactly once, in order and non-empty.",
                            "wrap each part in <|name_begin|>…<|name_end|> or <name>…</name> tags.")
            content = join_spans(spans)
        messages.append({"role": expected, "content": content})
    if len(messages) < 3:
        raise error("messages", ROLE_ORDER, f"the dialogue has {len(messages)} messages and no assistant turn.",
                    "a dialogue needs a system message, a user message and at least one assistant reply.")
    return tuple(messages)
