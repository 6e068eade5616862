"""From dialogues to prompts: turn samples, the system message, easy/hard, and judge context.

Every assistant turn of a dialogue is one sample (KardiaBench's "turn-level pairs"): the prompt is
the system message (persona + situation) and the whole history before the turn; the target is the
turn itself. Turning prompts into tokens is the tokenizer's job (`Tokenizer.render_chat`).

How earlier assistant turns appear in a prompt is `history` (config `data.history`, one of HISTORY_MODES).
A KardiaBench dialogue has one emotion label, so an earlier turn that keeps its emotion span (or a
reasoning span that names the emotion) hands the label to every later turn. `python -m
kardia_jax.data.prompts [SOURCE]` prints, per mode, how many turns' prompts hold their gold label
(`leak_report`). On the shipped sample's train split (198 turns, 71 of them hard):

  history      in an emotion span (hard / all)   as a word in earlier assistant turns (hard / all)
  full         35/71  150/198                    35/71  150/198
  no_emotion    0/71    0/198                    35/71  150/198   (the reasoning span names it)
  response      0/71    0/198                     0/71    0/198
"""

from __future__ import annotations

import dataclasses
import re

from kardia_jax.data.schema import Dialogue, TurnSample
from kardia_jax.spans import SPAN_MARKERS, SPAN_NAMES, join_spans, parse_spans

SYSTEM_TEMPLATE = (
    "You support {anon_username}. Reply with understanding, reasoning, emotion and response.\n"
    "Profile:\n{person}\n"
    "Situation: {situation}"
)


def system_message(person: str, situation: str, anon_username: str) -> str:
    """The system message kardia_jax writes for a persona and situation (the shipped sample uses it)."""
    return SYSTEM_TEMPLATE.format(person=person.strip(), situation=situation.strip(), anon_username=anon_username)


DIFFICULTY_RULES = ("emotion_word", "turn_index")  # the kinds of `DifficultyRule`

# Labels that are also everyday words ("the content of the email", "I'm prepared for the exam", "caring
# for my dad"): `DifficultyRule` counts them only inside a feeling construction (FEELING_CONSTRUCTION).
AMBIGUOUS_LABELS = ("content", "caring", "prepared", "trusting", "faithful")

# "<lead> [up to two intensifiers] <label>", the label not followed by "for"/"to" (which make
# "prepared for", "caring for", "faithful to" ordinary uses). {label} is filled in per label.
FEELING_CONSTRUCTION = (
    r"\b(?:feel|feels|feeling|felt|i am|i'm|i’m|im|i was|i've been|i have been|makes me|made me|making me"
    r"|would say|i'd say|call it|(?:word|name)(?: \w+){{0,4}} is)"
    r"\s+(?:(?:so|very|really|quite|pretty|totally|truly|deeply|still|just|fairly|rather|incredibly|extremely"
    r"|a bit|a little|kind of|sort of)\s+){{0,2}}{label}\b(?!\s+(?:for|to)\b)"
)


@dataclasses.dataclass(frozen=True)
class DifficultyRule:
    """Decides "easy" or "hard" for turns whose row has no `difficulty` field.

    kind="emotion_word" (default): a turn is easy when its user has stated the gold emotion up to and
      including the turn's user message — the label can be read off the context. A label is stated
      when it appears as a whole word in any case; one of AMBIGUOUS_LABELS only inside a feeling
      construction ("I feel content", "I'm so trusting", not "the content of the email"). Otherwise
      the label has to be inferred from cues, and the turn is hard.
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
        label = re.escape(emotion)
        pattern = FEELING_CONSTRUCTION.format(label=label) if emotion in AMBIGUOUS_LABELS else rf"\b{label}\b"
        return "easy" if re.search(pattern, user_text, flags=re.IGNORECASE) else "hard"


# How earlier assistant turns are rendered in a prompt (config `data.history`):
#   "full": all four spans, as in the data (the gold label of a dialogue is in every later prompt);
#   "no_emotion": understanding, reasoning and response spans (a reasoning span may still name it);
#   "response": the response span's text only, as reasoning models drop earlier reasoning (default).
HISTORY_MODES = ("full", "no_emotion", "response")


def history_message(content: str, history: str) -> str:
    """An earlier assistant turn (canonical four-span text) as a prompt shows it under `history`."""
    if history not in HISTORY_MODES:
        raise ValueError(f"history is '{history}'; use one of {HISTORY_MODES} (config data.history).")
    spans = parse_spans(content)
    if history == "full":
        return join_spans(spans)
    if history == "no_emotion":
        return join_spans(spans, tuple(n for n in SPAN_NAMES if n != "emotion"))
    return spans["response"]


def expand_dialogue(dialogue: Dialogue, rule: DifficultyRule = DifficultyRule(),
                    history: str = "response") -> list[TurnSample]:
    """One `TurnSample` per assistant turn of `dialogue`, in order.

    The prompt of assistant turn k is the system message and all messages before it, so it ends with
    the user message that the turn answers; earlier assistant turns are rendered as `history` says
    (HISTORY_MODES). The default, "response", keeps only their response span: a dialogue has one
    emotion label, and an earlier turn's emotion or reasoning span would give it away. The target
    is the whole four-span turn in canonical markers.
    """
    samples = []
    messages = tuple(m if m["role"] != "assistant" else {"role": "assistant",
                                                         "content": history_message(m["content"], history)}
                     for m in dialogue.messages)
    for position in range(2, len(messages), 2):  # assistant messages sit at even positions >= 2
        prompt = messages[:position]
        turn_index = position // 2 - 1
        difficulty = dialogue.difficulty or rule.difficulty(prompt, dialogue.emotion, turn_index)
        samples.append(TurnSample(
            dialogue_id=dialogue.dialogue_id,
            row=dialogue.row,
            turn_index=turn_index,
            prompt=prompt,
            target=dialogue.messages[position]["content"],
            emotion=dialogue.emotion,
            persona=dialogue.person,
            situation=dialogue.situation,
            mbti=dialogue.mbti,
            difficulty=difficulty,
        ))
    return samples


def expand_dialogues(dialogues: list[Dialogue], rule: DifficultyRule = DifficultyRule(),
                     history: str = "response") -> list[TurnSample]:
    """All turn samples of `dialogues`, dialogue by dialogue."""
    return [sample for dialogue in dialogues for sample in expand_dialogue(dialogue, rule, history)]


def dialogue_context(sample: TurnSample) -> str:
    """The conversation before `sample`'s turn as plain text for a judge: one "User: …" or
    "Assistant: …" line per message, assistant turns reduced to their response span whatever the
    prompt's `history` mode (the judge never sees an earlier emotion label)."""
    begin, end = SPAN_MARKERS["response"]
    lines = []
    for message in sample.prompt[1:]:
        content = message["content"].strip()
        if message["role"] == "user":
            lines.append(f"User: {content}")
        else:  # "full"/"no_emotion" keep the response span in markers; "response" is its text
            lines.append(f"Assistant: {content.split(begin)[-1].split(end)[0].strip()}")
    return "\n".join(lines)


def leak_report(samples: list[TurnSample]) -> dict[str, tuple[int, int]]:
    """How many of `samples` have their gold label in their prompt's earlier assistant turns.

    Returns {"span": (hard, all), "word": (hard, all), "turns": (hard, all)}: "span", turns whose
    prompt holds an emotion span equal to the label; "word", turns whose earlier assistant turns hold
    the label as a whole word (any span); "turns", the totals.
    """
    begin, end = SPAN_MARKERS["emotion"]
    counts = {"span": [0, 0], "word": [0, 0], "turns": [0, 0]}
    for sample in samples:
        history = " ".join(m["content"] for m in sample.prompt if m["role"] == "assistant")
        found = {"span": f"{begin}{sample.emotion}{end}" in history,
                 "word": re.search(rf"\b{re.escape(sample.emotion)}\b", history, flags=re.IGNORECASE) is not None,
                 "turns": True}
        for key, hit in found.items():
            counts[key][0] += hit and sample.difficulty == "hard"
            counts[key][1] += hit
    return {key: tuple(value) for key, value in counts.items()}


def main(argv: list[str]) -> None:
    """Prints `leak_report` for every history mode and the easy counts of the difficulty rule."""
    from kardia_jax.data import sources  # pylint: disable=import-outside-toplevel

    source = argv[1] if len(argv) > 1 else sources.sample_path()
    for split in ("train", "test"):
        dialogues, _ = sources.load_dialogues(source, split)
        for history in HISTORY_MODES:
            report = leak_report(expand_dialogues(dialogues, history=history))
            (hard, total), (span_hard, span_all), (word_hard, word_all) = (report[k] for k in ("turns", "span", "word"))
            print(f"{split:5s} history={history:10s} label in an emotion span: {span_hard}/{hard} hard, "
                  f"{span_all}/{total} all; as a word in earlier assistant turns: {word_hard}/{hard} hard, "
                  f"{word_all}/{total} all")
        easy = sum(s.difficulty == "easy" for s in expand_dialogues(dialogues))
        print(f"{split:5s} difficulty_rule=emotion_word: {easy} easy turns")


if __name__ == "__main__":
    import sys  # pylint: disable=import-outside-toplevel

    main(sys.argv)
