"""Writes the shipped synthetic sample, kardia_jax/assets/sample/{train,test}.jsonl.

KardiaBench may not be redistributed (CC BY-NC-ND 4.0), so kardia_jax ships its own small dataset in
exactly the KardiaBench schema, made from the templates below and a seeded RNG (the output is
deterministic; tests/test_data.py checks the committed files equal a fresh run):

  * 64 dialogues (48 train, 16 test), 3 to 5 user/assistant pairs each (8 messages on average),
  * every one of the 32 emotion labels in train: the 16 labels of the test split twice each, the
    other 16 once,
  * 24 personas (MBTI, About, Signature, Recent Activities), 18 train-only and 6 test-only,
  * the emotion is learnable from the user's words only: each label has three cue sentences, the same
    in train and test, and every user message holds one of them; the user also names the feeling in
    every message from the first one on (a quarter of the dialogues) or from the second one on (half
    of them), never in the last quarter (named turns are "easy" under the default difficulty rule,
    the others "hard"); no user text holds another label's word,
  * the system message says nothing about the label: every persona tells one of 16 neutral situations
    (a wedding, a new job, a move...) in two or three dialogues, each time with a different label, and
    no (situation, label) pair of the test split occurs in train,
  * a quarter of the dialogues use the `<understanding>…</understanding>` tag style,
  * spans of one or two short sentences: with the shipped tokenizer a train sample (prompt + target) has
    ~340 tokens at the median and at most ~550; a max_length of 384 truncates the history of a quarter.

Usage: python scripts/make_sample_data.py [--out_dir kardia_jax/assets/sample]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from typing import NamedTuple

from kardia_jax.data.prompts import system_message
from kardia_jax.spans import EMOTIONS, SPAN_NAMES

SEED = 20260101
NUM_TEST_PERSONAS = 6
NUM_TEST_EMOTIONS = 16  # each once in test and twice in train; the other labels once in train
PAIRS_PER_DIALOGUE = (3, 4, 4, 5)  # drawn uniformly: 4 pairs (8 messages) on average
XML_TAG_FRACTION = 0.25
# From which user message on (0-based) the user names the feeling, one entry per dialogue in turn:
# a quarter never, a quarter from the first message, half from the second.
NAMES_FROM = (None, 0, 1, 1)


class Scenario(NamedTuple):
    situation: str  # third person, for the system message
    gist: str  # second person, "You are <gist>."
    opener: str  # the user's first words


class Emotion(NamedTuple):
    family: str  # picks the response templates
    need: str  # what support fits, "you may want <need>"
    cues: tuple[str, str, str]  # user sentences that imply the label without naming it


EMOTION_BANK = {
    "surprised": Emotion("surprise", "a moment to take it all in", (
        "I did not see that coming at all",
        "My jaw literally dropped",
        "It came completely out of nowhere")),
    "excited": Emotion("positive", "someone to share the buzz with", (
        "I keep bouncing around the apartment",
        "I literally cannot sit still",
        "I have been grinning all day")),
    "annoyed": Emotion("anger", "room to vent", (
        "It keeps getting on my nerves",
        "I have asked them to stop like ten times",
        "It is such a small thing but it bugs me")),
    "proud": Emotion("positive", "credit for the hard work", (
        "I worked so hard for this",
        "I keep looking at the result and smiling",
        "Nobody thought I could pull it off")),
    "angry": Emotion("anger", "a way to stand up for yourself", (
        "My blood is boiling",
        "They had no right to do that",
        "I had to walk away before I yelled")),
    "sad": Emotion("sadness", "gentle company", (
        "I cried on the way home",
        "Everything feels heavy today",
        "I just want to stay in bed")),
    "grateful": Emotion("positive", "a way to say thank you", (
        "I do not know how to repay them",
        "They did not have to do that for me",
        "I feel so lucky to have them")),
    "lonely": Emotion("sadness", "connection and company", (
        "Nobody has texted me in days",
        "I eat dinner by myself every night",
        "The apartment is so quiet")),
    "impressed": Emotion("positive", "a chance to learn from it", (
        "I could not believe how good it was",
        "They made it look so easy",
        "I want to be that skilled one day")),
    "afraid": Emotion("fear", "reassurance and safety", (
        "I keep hearing noises at night",
        "My hands were shaking",
        "I checked the locks three times")),
    "disgusted": Emotion("anger", "distance from what happened", (
        "It made my stomach turn",
        "I could not even look at it",
        "The smell is still in my head")),
    "confident": Emotion("positive", "encouragement to go for it", (
        "I know I can handle it",
        "I have practiced this a hundred times",
        "I am sure I will nail it")),
    "terrified": Emotion("fear", "grounding and a plan", (
        "I could barely breathe",
        "I thought I was going to die",
        "My whole body froze")),
    "hopeful": Emotion("positive", "support while you wait", (
        "I think things might finally turn around",
        "This could be the fresh start I needed",
        "I am keeping my fingers crossed")),
    "anxious": Emotion("fear", "calm and a small next step", (
        "My stomach is in knots",
        "I keep checking my phone every minute",
        "I barely slept last night")),
    "disappointed": Emotion("sadness", "room to feel the letdown", (
        "I really thought it would work out",
        "All that effort and nothing to show",
        "It just fell flat")),
    "joyful": Emotion("positive", "someone to celebrate with", (
        "I feel like dancing",
        "Today has been pure sunshine",
        "I cannot stop laughing")),
    "prepared": Emotion("positive", "a final check before the big day", (
        "Everything is packed and labeled",
        "I went over my notes one last time",
        "I have a backup plan for the backup plan")),
    "guilty": Emotion("self", "a way to make amends", (
        "I should have been there",
        "I keep thinking it was my fault",
        "I cannot look them in the eye")),
    "furious": Emotion("anger", "space to cool down before acting", (
        "I am shaking with rage",
        "I want to scream",
        "This is completely unacceptable")),
    "nostalgic": Emotion("sadness", "time with the memories", (
        "It reminded me of summers at my grandma's",
        "Those were simpler days",
        "I miss how things used to be")),
    "jealous": Emotion("anger", "a kinder look at your own path", (
        "Why does it always work out for them",
        "I wish I had what they have",
        "I could not even congratulate them properly")),
    "anticipating": Emotion("anticipation", "something to do with the waiting", (
        "I am counting down the days",
        "I keep picturing how it will go",
        "I have the date circled on my calendar")),
    "embarrassed": Emotion("self", "a lighter view of the moment", (
        "My face went bright red",
        "Everyone was staring at me",
        "I wanted the floor to swallow me")),
    "content": Emotion("positive", "time to savor it", (
        "Nothing big, just a calm good day",
        "I have everything I need right now",
        "I am at peace with how things are")),
    "devastated": Emotion("sadness", "patience and support", (
        "My world fell apart",
        "I cannot stop crying",
        "I do not know how to go on")),
    "sentimental": Emotion("sadness", "space to treasure the memory", (
        "I teared up holding it",
        "It means more to me than anything",
        "I keep it by my bed")),
    "caring": Emotion("positive", "ways to look after them and yourself", (
        "I just want to make sure they are okay",
        "I made soup and brought it over",
        "I check on them every morning")),
    "trusting": Emotion("positive", "confirmation that your trust is well placed", (
        "I gave them my spare key without a second thought",
        "I know they have my back",
        "I would leave my kids with them any day")),
    "ashamed": Emotion("self", "kindness toward yourself", (
        "I cannot believe I did that",
        "I hid it from everyone",
        "I feel so small")),
    "apprehensive": Emotion("fear", "a clear picture of what to expect", (
        "I am not sure it is a good idea",
        "Something about it makes me hesitate",
        "I keep going back and forth")),
    "faithful": Emotion("positive", "support for your commitment", (
        "I have stood by them for ten years",
        "I would never give up on them",
        "We promised to stick together")),
}

# Neutral situations: any of the 32 feelings can follow each of them, so only the user's words tell.
SCENARIOS = (
    Scenario("Their sister is getting married next month.",
             "thinking about your sister's wedding next month",
             "My sister is getting married next month."),
    Scenario("They started a new job this week.",
             "starting a new job this week",
             "I started a new job this week."),
    Scenario("They moved into a new apartment.",
             "moving into a new apartment",
             "I just moved into a new apartment."),
    Scenario("Their best friend called them late last night.",
             "taking a late call from your best friend",
             "My best friend called me late last night."),
    Scenario("Their team had a long meeting at work.",
             "coming out of a long team meeting",
             "We had a long team meeting at work today."),
    Scenario("Their parents came to stay for the weekend.",
             "having your parents over for the weekend",
             "My parents came to stay for the weekend."),
    Scenario("They got their exam results back.",
             "getting your exam results back",
             "I got my exam results back today."),
    Scenario("Their neighbor knocked on their door this morning.",
             "talking with your neighbor at the door",
             "My neighbor knocked on my door this morning."),
    Scenario("They went to a reunion at their old school.",
             "going back to your old school for a reunion",
             "I went to a reunion at my old school."),
    Scenario("Their manager asked to see them on Friday.",
             "meeting your manager on Friday",
             "My manager asked to see me on Friday."),
    Scenario("They took the long train home to visit family.",
             "taking the long train home to your family",
             "I took the long train home to see my family."),
    Scenario("Their friend borrowed their car for the week.",
             "lending your car to a friend for the week",
             "My friend borrowed my car for the week."),
    Scenario("They spent the day clearing out their grandmother's attic.",
             "clearing out your grandmother's attic",
             "I spent the day clearing out my grandmother's attic."),
    Scenario("Their son started at a new school.",
             "seeing your son start at a new school",
             "My son started at a new school on Monday."),
    Scenario("They hosted a dinner for their coworkers.",
             "hosting dinner for your coworkers",
             "I hosted a dinner for my coworkers on Saturday."),
    Scenario("Their band played its first gig.",
             "playing your band's first gig",
             "My band played its first gig last night."),
)

EXPLICIT_FRAMES = ("Honestly, I feel {label}.", "If I had to name it, I would say {label}.",
                   "The only word I have for it is {label}.", "I still feel {label}.")
FOLLOW_UP_FRAMES = ("{cue}.", "{cue}, and I keep replaying it.", "Sorry, it is a lot. {cue}.",
                    "{filler} {cue}.", "Thanks for listening. {cue}.")
FILLERS = ("It has been a long week.", "I told my sister about it too.", "I am still thinking about it.",
           "I went for a walk to clear my head.")
UNDERSTANDING_FRAMES = ("You are {gist}.", "This is about {gist}.")
REASONING_CUE_FRAMES = ("It sounds {label}: '{cue}'", "I hear {label} in '{cue}'")  # label first: no copy before it
REASONING_NAMED_FRAMES = ("You named it: {label}", "In your words it is {label}")
VALIDATIONS = {
    "positive": ("That is wonderful news.", "I love hearing this.", "What a great moment for you."),
    "sadness": ("I am so sorry you are going through this.", "That sounds really painful.",
                "It makes sense that this hurts."),
    "fear": ("That sounds really scary to carry.", "It is okay to feel shaken by this.",
             "Anyone would feel uneasy here."),
    "anger": ("That would upset most people.", "Your frustration makes sense.", "It is fair to be bothered by that."),
    "self": ("Please go easy on yourself.", "Everyone slips up sometimes.", "That moment does not define you."),
    "surprise": ("Wow, that is a lot to take in.", "What a twist.", "No wonder you are still processing it."),
    "anticipation": ("Waiting like this is intense.", "The build-up is real.", "That date must feel close and far."),
}
OFFERS = ("Would {need} help right now?", "Maybe start with {need}.", "Your {hobby} might help you reset tonight.",
          "Want to talk through the next step?")


class Persona(NamedTuple):
    mbti: str
    about: str
    signature: str
    activities: tuple[str, str]
    hobby: str  # "your <hobby>"


PERSONAS = (
    Persona("INFJ", "I teach piano to kids and write short poems.", "Small notes make big songs.",
            ("Wrote a poem a day for a month", "Played at a school recital"), "piano"),
    Persona("ENTP", "I run a repair shop for old radios.", "If it hums, it can be fixed.",
            ("Restored a radio from 1952", "Joined a debate club"), "radio projects"),
    Persona("ISTJ", "I am an accountant who loves long hikes.", "Plan the work, work the plan.",
            ("Hiked a ridge trail", "Sorted ten years of receipts"), "hikes"),
    Persona("ENFP", "I paint murals and host open mic nights.", "Color outside the lines.",
            ("Painted a cafe wall", "Hosted a poetry night"), "sketchbook"),
    Persona("INTJ", "I design bridges and build model trains.", "Measure twice, cut once.",
            ("Finished a model railway", "Read about old bridges"), "model trains"),
    Persona("ESFJ", "I am a nurse and I bake for my whole street.", "Warm bread, warm hearts.",
            ("Baked cookies for the night shift", "Ran a charity bake sale"), "baking"),
    Persona("ISFP", "I take photos of birds and grow herbs.", "Quiet eyes see more.",
            ("Spotted a kingfisher", "Planted basil on the balcony"), "bird walks"),
    Persona("ESTP", "I coach a youth soccer team and ride motorbikes.", "Go first, think fast.",
            ("Won a youth league match", "Rode along the coast"), "rides"),
    Persona("INFP", "I write fantasy stories and volunteer at a library.", "Every page is a door.",
            ("Finished a story draft", "Ran a reading hour for kids"), "writing"),
    Persona("ENTJ", "I manage a startup that makes solar lamps.", "Build it, ship it.",
            ("Pitched to investors", "Visited a solar farm"), "morning runs"),
    Persona("ISFJ", "I am a librarian who knits scarves for shelters.", "Kindness, one stitch at a time.",
            ("Knitted twelve scarves", "Organized a book swap"), "knitting"),
    Persona("ESTJ", "I manage a warehouse and referee basketball.", "Rules keep the game fair.",
            ("Refereed a city final", "Reorganized the loading dock"), "basketball games"),
    Persona("INTP", "I study math and play chess online.", "Why is the best question.",
            ("Solved an old puzzle", "Reached a new chess rating"), "chess games"),
    Persona("ENFJ", "I lead a community choir and teach history.", "Together we sound better.",
            ("Led a spring concert", "Took students to a museum"), "choir practice"),
    Persona("ISTP", "I fix bikes and climb rocks on weekends.", "Hands first, words later.",
            ("Rebuilt a road bike", "Climbed a new route"), "climbing"),
    Persona("ESFP", "I dance salsa and work at a theater.", "Life is a stage, so dance.",
            ("Danced at a street festival", "Worked a sold out show"), "dance classes"),
    Persona("INFJ", "I am a counselor who grows roses.", "Roots before blooms.",
            ("Pruned the rose beds", "Attended a calm retreat"), "rose garden"),
    Persona("ENTP", "I am a software tester who does stand up comedy.", "Break it to make it.",
            ("Did a five minute set", "Found a tricky bug"), "comedy nights"),
    Persona("ISTJ", "I drive a city bus and collect stamps.", "On time, every time.",
            ("Found a rare stamp", "Drove a new route"), "stamp album"),
    Persona("ENFP", "I travel with a camera and teach English.", "Say yes to the road.",
            ("Taught an evening class", "Took a night train"), "travel photos"),
    Persona("INTJ", "I research plants and brew tea.", "Slow growth is still growth.",
            ("Published a short paper", "Tried a smoky tea"), "tea brewing"),
    Persona("ESFJ", "I run a daycare and sing in a band.", "Sing it loud.",
            ("Played a pub gig", "Planned a picnic for the kids"), "band rehearsals"),
    Persona("ISFP", "I make pottery and walk my dog at dawn.", "Clay remembers every touch.",
            ("Fired a set of bowls", "Walked by the river at sunrise"), "pottery wheel"),
    Persona("INTP", "I repair clocks and read about space.", "Time is just gears.",
            ("Fixed a grandfather clock", "Watched a meteor shower"), "stargazing"),
)


def person_text(persona: Persona) -> str:
    """The raw profile text, as in KardiaBench's `person` field."""
    return (f"MBTI: {persona.mbti}\nAbout: {persona.about}\nSignature: {persona.signature}\n"
            f"Recent Activities: {'; '.join(persona.activities)}")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _assistant_turn(rng: random.Random, label: str, emotion: Emotion, scenario: Scenario, persona: Persona,
                    cue: str, named: bool, xml_tags: bool) -> str:
    """Four short spans answering a user message that holds `cue` (and, if `named`, the label)."""
    understanding = rng.choice(UNDERSTANDING_FRAMES).format(gist=scenario.gist)
    if named:
        evidence = rng.choice(REASONING_NAMED_FRAMES).format(label=label)
    else:
        evidence = rng.choice(REASONING_CUE_FRAMES).format(cue=cue, label=label)
    reasoning = f"{evidence}, and as an {persona.mbti} you may want {emotion.need}."
    offer = rng.choice(OFFERS).format(need=emotion.need, hobby=persona.hobby)
    response = f"{rng.choice(VALIDATIONS[emotion.family])} {offer}"
    spans = {"understanding": understanding, "reasoning": reasoning, "emotion": label, "response": response}
    if xml_tags:
        return "".join(f"<{name}>{spans[name]}</{name}>" for name in SPAN_NAMES)
    return "".join(f"<|{name}_begin|>{spans[name]}<|{name}_end|>" for name in SPAN_NAMES)


def make_dialogue(rng: random.Random, label: str, scenario: Scenario, persona: Persona, anon_username: str,
                  names_from: int | None, xml_tags: bool) -> dict:
    """One KardiaBench-schema row. Every user message holds one of the label's cues; from the
    `names_from`-th message on (0-based; None: never) the user also names the feeling."""
    emotion = EMOTION_BANK[label]
    cues = list(emotion.cues)
    rng.shuffle(cues)
    pairs = rng.choice(PAIRS_PER_DIALOGUE)
    messages = [{"role": "system", "content": system_message(person_text(persona), scenario.situation,
                                                              anon_username)}]
    for pair in range(pairs):
        cue = cues[pair % len(cues)]
        if pair == 0:
            user = f"{scenario.opener} {_sentence(cue)}."
        else:
            user = rng.choice(FOLLOW_UP_FRAMES).format(cue=_sentence(cue), filler=rng.choice(FILLERS))
        named = names_from is not None and pair >= names_from
        if named:
            user = f"{user} {rng.choice(EXPLICIT_FRAMES).format(label=label)}"
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _assistant_turn(rng, label, emotion, scenario, persona,
                                                                          cue, named, xml_tags)})
    return {"person": person_text(persona), "mbti": persona.mbti, "emotion": label,
            "situation": scenario.situation, "anon_username": anon_username, "messages": messages}


def _groups(rng: random.Random, personas: list[int], num_dialogues: int) -> list[int]:
    """The persona of each dialogue, grouped: every persona gets two or three dialogues in a row (one
    conversation partner telling one situation several times, each time with another feeling)."""
    sizes = [3] * (num_dialogues - 2 * len(personas)) + [2] * (3 * len(personas) - num_dialogues)
    if len(sizes) != len(personas) or min(sizes, default=2) < 2:
        raise ValueError(f"{num_dialogues} dialogues do not split into groups of 2-3 over {len(personas)} personas.")
    rng.shuffle(sizes)
    return [p for p, size in zip(personas, sizes) for _ in range(size)]


def _assign_labels(rng: random.Random, groups: list[int], scenario_of: dict[int, int], labels: list[str],
                   forbidden: set[tuple[int, str]]) -> list[str]:
    """A label per dialogue of `groups` (a persona per dialogue) out of `labels` (used once each):
    different labels within a persona's group, and no (situation, label) pair from `forbidden`."""
    for _ in range(1000):
        order = list(labels)
        rng.shuffle(order)
        seen: set[tuple[int, str]] = set()
        ok = True
        for persona, label in zip(groups, order):
            pair = (scenario_of[persona], label)
            if pair in seen or pair in forbidden:
                ok = False
                break
            seen.add(pair)
        if ok:
            return order
    raise RuntimeError("No label assignment meets the constraints; change SEED.")


def build_sample(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), deterministic in `seed`.

    Every persona tells one situation in two or three dialogues, each with a different label, so the
    system message (persona + situation) never gives the label away: only the user's words do."""
    rng = random.Random(seed)
    persona_order = list(range(len(PERSONAS)))
    rng.shuffle(persona_order)
    test_personas, train_personas = persona_order[:NUM_TEST_PERSONAS], persona_order[NUM_TEST_PERSONAS:]
    usernames = {i: f"user_{rng.randrange(16 ** 6):06x}" for i in persona_order}
    scenario_order = list(range(len(SCENARIOS)))
    rng.shuffle(scenario_order)
    scenario_order += rng.sample(range(len(SCENARIOS)), len(PERSONAS) - len(SCENARIOS))
    scenario_of = dict(zip(persona_order, scenario_order))  # every situation once or twice

    test_labels = rng.sample(EMOTIONS, NUM_TEST_EMOTIONS)
    train_labels = list(EMOTIONS) + test_labels
    test_groups = _groups(rng, test_personas, len(test_labels))
    train_groups = _groups(rng, train_personas, len(train_labels))
    test_order = _assign_labels(rng, test_groups, scenario_of, test_labels, set())
    train_order = _assign_labels(rng, train_groups, scenario_of, train_labels,
                                 {(scenario_of[p], label) for p, label in zip(test_groups, test_order)})

    splits = []
    for groups, labels in ((train_groups, train_order), (test_groups, test_order)):
        names_from = [NAMES_FROM[i % len(NAMES_FROM)] for i in range(len(groups))]
        rng.shuffle(names_from)
        rows = []
        for i, (persona_index, label) in enumerate(zip(groups, labels)):
            rows.append(make_dialogue(rng, label, SCENARIOS[scenario_of[persona_index]], PERSONAS[persona_index],
                                      usernames[persona_index], names_from[i], rng.random() < XML_TAG_FRACTION))
        _check_label_words(rows)
        splits.append(rows)
    return splits[0], splits[1]


def _check_label_words(rows: list[dict]) -> None:
    """No emotion word but the gold one anywhere in a row, so the label is never given away by accident."""
    for row in rows:
        text = " ".join(m["content"] for m in row["messages"]) + " " + row["situation"]
        for label in EMOTIONS:
            if label != row["emotion"] and re.search(rf"\b{label}\b", text, flags=re.IGNORECASE):
                raise AssertionError(f"Row with emotion '{row['emotion']}' mentions the label '{label}'.")


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    default_dir = os.path.join(os.path.dirname(__file__), "..", "kardia_jax", "assets", "sample")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=os.path.normpath(default_dir))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    train, test = build_sample(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        write_jsonl(rows, os.path.join(args.out_dir, f"{name}.jsonl"))
        print(f"{name}: {len(rows)} dialogues, {sum(len(r['messages']) // 2 for r in rows)} assistant turns")


if __name__ == "__main__":
    main()
