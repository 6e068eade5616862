"""From dialogues to prompts: turn samples, the system message, easy/hard, and judge context.

Every assistant turn of a dialogue is one sample (KardiaBench's "turn-level pairs"): the prompt is
the system message (persona + situation) and the whole history before the turn; the target is the
turn itself. Turning prompts into tokens is the tokenizer's job (`Tokenizer.render_chat`).
"""

from __future__ import annotations

import dataclasses
import re

from kardia_jax.data.schema import Dialogue, TurnSample
from kardia_jax.data.spans import parse_spans

SYSTEM_TEMPLATE = (
    "You support {anon_username}. Reply with understanding, reasoning, emotion and response.\n"
    "Profile:\n{person}\n"
    "Situation: {situation}"
)


def system_message(person: str, situation: str, anon_username: str) -> str:
    """The system message kardia_jax writes for a persona and situation (the shipped sample uses it)."""
    return SYSTEM_TEMPLATE.format(person=person.strip(), situation=situation.strip(), anon_username=anon_username)


DIFFICULTY_RULES = ("emotion_word", "turn_index")  # the kinds of `DifficultyRule`


@dataclasses.dataclass(frozen=True)
class DifficultyRule:
    """Decides "easy" or "hard" for turns whose row has no `difficulty` field.

    kind="emotion_word" (default): a turn is easy when its gold emotion word appears, as a whole word
      in any case, in what the user has said up to and including the turn's user message — the label
      can be read off the context. Otherwise it has to be inferred from cues, and the turn is hard.
    kind="turn_index": a turn is easy when its index (0-based among assistant turns) is below
      `easy_turns`; later turns, with long histories, are hard.
    """

    kind: str = "emotion_word"
    easy_turns: int = 2

    def __post_init__(self):
        if self.kind not in DIFFICULTY_RULES:
            raise ValueError(f"DifficultyRule.kind is '{self.kind}'; use one of {DIFFICULTY_RULES}.")

    def difficulty(self, prompt: tuple[dict[str, str], ...], emotion: str, turn_index: int) -> str:
        if self.kind == "turn_index":
            return "easy" if turn_index < self.easy_turns else "hard"
        user_text = " ".join(m["content"] for m in prompt if m["role"] == "user")
        stated = re.search(rf"\b{re.escape(emotion)}\b", user_text, flags=re.IGNORECASE)
        return "easy" if stated else "hard"


def expand_dialogue(dialogue: Dialogue, rule: DifficultyRule = DifficultyRule()) -> list[TurnSample]:
    """One `TurnSample` per assistant turn of `dialogue`, in order.

    The prompt of assistant turn k is the system message and all messages before it, so it ends with
    the user message that the turn answers. Earlier assistant turns stay in the history exactly as in
    the data — all four spans, in canonical markers — rather than cut down to their response span:
    that is what the paper means by "the prompt is everything before it", it is what the model sees
    when it converses with its own four-span outputs at inference, and it keeps one tag style in every
    prompt whichever style the row used.
    """
    samples = []
    messages = dialogue.messages
    for position in range(2, len(messages), 2):  # assistant messages sit at even positions >= 2
        prompt = messages[:position]
        turn_index = position // 2 - 1
        difficulty = dialogue.difficulty or rule.difficulty(prompt, dialogue.emotion, turn_index)
        samples.append(TurnSample(
            dialogue_id=dialogue.dialogue_id,
            row=dialogue.row,
            turn_index=turn_index,
            prompt=prompt,
            target=messages[position]["content"],
            emotion=dialogue.emotion,
            persona=dialogue.person,
            situation=dialogue.situation,
            mbti=dialogue.mbti,
            difficulty=difficulty,
        ))
    return samples


def expand_dialogues(dialogues: list[Dialogue], rule: DifficultyRule = DifficultyRule()) -> list[TurnSample]:
    """All turn samples of `dialogues`, dialogue by dialogue."""
    return [sample for dialogue in dialogues for sample in expand_dialogue(dialogue, rule)]


def fold_system_message(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Moves a leading system message into the first user message (for chat formats without a system
    role, e.g. Gemma): "<system>\\n\\n<user>"."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system['content']}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": system["content"]}, *rest]


def dialogue_context(sample: TurnSample) -> str:
    """The conversation before `sample`'s turn as plain text for a judge: one "User: …" or
    "Assistant: …" line per message, assistant turns reduced to their response span."""
    lines = []
    for message in sample.prompt[1:]:
        if message["role"] == "user":
            lines.append(f"User: {message['content'].strip()}")
        else:
            lines.append(f"Assistant: {parse_spans(message['content'])['response']}")
    return "\n".join(lines)
