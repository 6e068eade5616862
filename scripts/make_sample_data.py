"""Writes the shipped synthetic sample, kardia_jax/assets/sample/{train,test}.jsonl.

KardiaBench may not be redistributed (CC BY-NC-ND 4.0), so kardia_jax ships its own small dataset in
exactly the KardiaBench schema, made from the templates below and a seeded RNG (the output is
deterministic; tests/test_data.py checks the committed files equal a fresh run):

  * 64 dialogues (48 train, 16 test), 3 to 5 user/assistant pairs each (8 messages on average),
  * every one of the 32 emotion labels twice — once per scenario — and all 32 in train,
  * 24 personas (MBTI, About, Signature, Recent Activities), 18 train-only and 6 test-only,
  * the emotion is learnable from the user's words: each label has its own cue sentences, and in half
    of the dialogues the user also names the feeling ("easy" turns under the default difficulty rule);
    no user text holds another label's word,
  * a quarter of the dialogues use the `<understanding>…</understanding>` tag style,
  * spans of one or two short sentences: with the shipped tokenizer a train sample (prompt + target) has
    ~300 tokens at the median and at most ~550; a max_length of 384 truncates the history of a quarter.

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
from kardia_jax.data.spans import EMOTIONS, SPAN_NAMES

SEED = 20260101
NUM_TEST_PERSONAS = 6
NUM_TEST_EMOTIONS = 16
PAIRS_PER_DIALOGUE = (3, 4, 4, 5)  # drawn uniformly: 4 pairs (8 messages) on average
XML_TAG_FRACTION = 0.25


class Scenario(NamedTuple):
    situation: str  # third person, for the system message
    gist: str  # second person, "You are <gist>."
    opener: str  # the user's first words


class Emotion(NamedTuple):
    family: str  # picks the response templates
    need: str  # what support fits, "you may want <need>"
    cues: tuple[str, str, str]  # user sentences that imply the label without naming it
    scenarios: tuple[Scenario, Scenario]


EMOTION_BANK = {
    "surprised": Emotion("surprise", "a moment to take it all in", (
        "I did not see that coming at all",
        "My jaw literally dropped",
        "It came completely out of nowhere"), (
        Scenario("Their quiet neighbor turned out to be a famous jazz drummer.",
                 "finding out your quiet neighbor is a famous drummer",
                 "So my quiet neighbor is apparently a famous jazz drummer."),
        Scenario("Their manager gave them a raise they never asked for.",
                 "getting a raise you never asked for",
                 "My manager just handed me a raise I never even asked for."))),
    "excited": Emotion("positive", "someone to share the buzz with", (
        "I keep bouncing around the apartment",
        "I literally cannot sit still",
        "I have been grinning all day"), (
        Scenario("They got tickets to see their favorite band live next month.",
                 "getting tickets to see your favorite band",
                 "I just got tickets to see my favorite band next month!"),
        Scenario("They are starting a new job at a game studio on Monday.",
                 "starting a new job at a game studio",
                 "I start my new job at a game studio on Monday."))),
    "annoyed": Emotion("anger", "room to vent", (
        "It keeps getting on my nerves",
        "I have asked them to stop like ten times",
        "It is such a small thing but it bugs me"), (
        Scenario("Their roommate keeps leaving dirty dishes in the sink.",
                 "dealing with dishes your roommate leaves in the sink",
                 "My roommate left dirty dishes in the sink again."),
        Scenario("A coworker keeps tapping a pen during every meeting.",
                 "sitting through a coworker tapping a pen in meetings",
                 "A coworker taps his pen through every single meeting."))),
    "proud": Emotion("positive", "credit for the hard work", (
        "I worked so hard for this",
        "I keep looking at the result and smiling",
        "Nobody thought I could pull it off"), (
        Scenario("Their daughter learned to ride a bike after weeks of practice with them.",
                 "watching your daughter finally ride her bike",
                 "My daughter rode her bike on her own today after weeks of practice."),
        Scenario("They finished their first marathon.",
                 "finishing your first marathon",
                 "I finished my first marathon yesterday."))),
    "angry": Emotion("anger", "a way to stand up for yourself", (
        "My blood is boiling",
        "They had no right to do that",
        "I had to walk away before I yelled"), (
        Scenario("Someone scratched their car in a parking lot and drove off.",
                 "finding your car scratched by someone who drove off",
                 "Someone scratched my car in the parking lot and just drove off."),
        Scenario("A colleague took credit for their project in front of the boss.",
                 "seeing a colleague take credit for your project",
                 "A colleague presented my project to the boss as his own."))),
    "sad": Emotion("sadness", "gentle company", (
        "I cried on the way home",
        "Everything feels heavy today",
        "I just want to stay in bed"), (
        Scenario("Their best friend moved to another country.",
                 "saying goodbye to your best friend who moved abroad",
                 "My best friend moved to another country this week."),
        Scenario("Their old cat had to be put to sleep.",
                 "losing your old cat",
                 "We had to put our old cat to sleep on Sunday."))),
    "grateful": Emotion("positive", "a way to say thank you", (
        "I do not know how to repay them",
        "They did not have to do that for me",
        "I feel so lucky to have them"), (
        Scenario("A stranger returned the wallet they had lost, with all the cash inside.",
                 "getting your lost wallet back from a stranger",
                 "A stranger found my lost wallet and brought it back with all the cash."),
        Scenario("Their neighbors cooked meals for them while they were ill.",
                 "having neighbors cook for you while you were ill",
                 "My neighbors cooked for me every day while I was ill."))),
    "lonely": Emotion("sadness", "connection and company", (
        "Nobody has texted me in days",
        "I eat dinner by myself every night",
        "The apartment is so quiet"), (
        Scenario("They moved to a new city and do not know anyone yet.",
                 "settling into a new city where you know no one",
                 "I moved to a new city a month ago and I do not know anyone."),
        Scenario("All their friends are busy with new families.",
                 "watching your friends get busy with their families",
                 "All my friends have kids now and never have time."))),
    "impressed": Emotion("positive", "a chance to learn from it", (
        "I could not believe how good it was",
        "They made it look so easy",
        "I want to be that skilled one day"), (
        Scenario("Their younger brother built a working robot for a school fair.",
                 "seeing the robot your brother built",
                 "My younger brother built a working robot for his school fair."),
        Scenario("A street musician played a flawless violin solo.",
                 "hearing a street musician play a flawless solo",
                 "A street musician played the most flawless violin solo today."))),
    "afraid": Emotion("fear", "reassurance and safety", (
        "I keep hearing noises at night",
        "My hands were shaking",
        "I checked the locks three times"), (
        Scenario("Someone tried to open their front door late at night.",
                 "hearing someone try your front door at night",
                 "Someone tried to open my front door last night."),
        Scenario("A big dog chased them on their morning run.",
                 "being chased by a big dog on your run",
                 "A huge dog chased me on my morning run."))),
    "disgusted": Emotion("anger", "distance from what happened", (
        "It made my stomach turn",
        "I could not even look at it",
        "The smell is still in my head"), (
        Scenario("They found mold all over the food in the office fridge.",
                 "finding mold all over the office fridge",
                 "I opened the office fridge and there was mold everywhere."),
        Scenario("A restaurant served them soup with a hair in it.",
                 "finding a hair in your restaurant soup",
                 "The restaurant served me soup with a hair floating in it."))),
    "confident": Emotion("positive", "encouragement to go for it", (
        "I know I can handle it",
        "I have practiced this a hundred times",
        "I am sure I will nail it"), (
        Scenario("They have a job interview tomorrow for a role they know well.",
                 "heading into an interview for a role you know well",
                 "I have a job interview tomorrow for a role I know inside out."),
        Scenario("They are giving a talk at a conference they worked on all month.",
                 "giving a conference talk you worked on all month",
                 "I give my conference talk on Friday."))),
    "terrified": Emotion("fear", "grounding and a plan", (
        "I could barely breathe",
        "I thought I was going to die",
        "My whole body froze"), (
        Scenario("Their plane dropped suddenly in heavy turbulence.",
                 "living through a sudden drop in turbulence",
                 "Our plane dropped suddenly in heavy turbulence."),
        Scenario("They got stuck in an elevator for an hour.",
                 "being stuck in an elevator for an hour",
                 "I got stuck in an elevator for a whole hour."))),
    "hopeful": Emotion("positive", "support while you wait", (
        "I think things might finally turn around",
        "This could be the fresh start I needed",
        "I am keeping my fingers crossed"), (
        Scenario("They had a good second interview for their dream job.",
                 "waiting after a good second interview",
                 "The second interview for my dream job went really well."),
        Scenario("Their father started a new treatment that seems to work.",
                 "seeing your father respond to a new treatment",
                 "My dad started a new treatment and the first results look good."))),
    "anxious": Emotion("fear", "calm and a small next step", (
        "My stomach is in knots",
        "I keep checking my phone every minute",
        "I barely slept last night"), (
        Scenario("They are waiting for the results of a medical test.",
                 "waiting for your medical test results",
                 "I am still waiting for the results of my medical test."),
        Scenario("They have to give a speech at their sister's wedding.",
                 "preparing a speech for your sister's wedding",
                 "I have to give a speech at my sister's wedding."))),
    "disappointed": Emotion("sadness", "room to feel the letdown", (
        "I really thought it would work out",
        "All that effort and nothing to show",
        "It just fell flat"), (
        Scenario("Their band was not picked for the city festival.",
                 "hearing your band was not picked for the festival",
                 "Our band did not get picked for the city festival."),
        Scenario("Their trip was cancelled at the last minute.",
                 "having your trip cancelled at the last minute",
                 "My trip got cancelled at the very last minute."))),
    "joyful": Emotion("positive", "someone to celebrate with", (
        "I feel like dancing",
        "Today has been pure sunshine",
        "I cannot stop laughing"), (
        Scenario("Their sister had a healthy baby girl.",
                 "meeting your new baby niece",
                 "My sister just had a healthy baby girl."),
        Scenario("They spent a perfect day at the beach with old friends.",
                 "spending a perfect beach day with old friends",
                 "I spent the whole day at the beach with my oldest friends."))),
    "prepared": Emotion("positive", "a final check before the big day", (
        "Everything is packed and labeled",
        "I went over my notes one last time",
        "I have a backup plan for the backup plan"), (
        Scenario("They are about to move across the country.",
                 "getting ready to move across the country",
                 "I move across the country next week."),
        Scenario("They have a final exam in statistics tomorrow.",
                 "facing your statistics final tomorrow",
                 "My statistics final is tomorrow morning."))),
    "guilty": Emotion("self", "a way to make amends", (
        "I should have been there",
        "I keep thinking it was my fault",
        "I cannot look them in the eye"), (
        Scenario("They forgot their best friend's birthday.",
                 "forgetting your best friend's birthday",
                 "I completely forgot my best friend's birthday."),
        Scenario("They snapped at their mother over the phone.",
                 "snapping at your mom on the phone",
                 "I snapped at my mom on the phone last night."))),
    "furious": Emotion("anger", "space to cool down before acting", (
        "I am shaking with rage",
        "I want to scream",
        "This is completely unacceptable"), (
        Scenario("Their landlord kept the deposit for damage they did not cause.",
                 "losing your deposit for damage you did not cause",
                 "My landlord kept my whole deposit for damage I never caused."),
        Scenario("Someone hit their parked car and left no note.",
                 "finding your parked car hit with no note",
                 "Someone hit my parked car and left without a note."))),
    "nostalgic": Emotion("sadness", "time with the memories", (
        "It reminded me of summers at my grandma's",
        "Those were simpler days",
        "I miss how things used to be"), (
        Scenario("They found old photos from their childhood home.",
                 "looking through photos of your childhood home",
                 "I found a box of photos from the house I grew up in."),
        Scenario("They heard a song from their high school years on the radio.",
                 "hearing a song from your high school years",
                 "A song from my high school years came on the radio."))),
    "jealous": Emotion("anger", "a kinder look at your own path", (
        "Why does it always work out for them",
        "I wish I had what they have",
        "I could not even congratulate them properly"), (
        Scenario("Their coworker got the promotion they wanted.",
                 "watching a coworker get the promotion you wanted",
                 "My coworker got the promotion I wanted."),
        Scenario("Their friend posted photos from a dream vacation.",
                 "seeing a friend's dream vacation photos",
                 "My friend keeps posting photos from her dream vacation."))),
    "anticipating": Emotion("anticipation", "something to do with the waiting", (
        "I am counting down the days",
        "I keep picturing how it will go",
        "I have the date circled on my calendar"), (
        Scenario("Their partner is coming home after six months abroad.",
                 "waiting for your partner to come home",
                 "My partner comes home after six months abroad."),
        Scenario("They are about to open their own bakery.",
                 "getting close to opening your bakery",
                 "My bakery opens in two weeks."))),
    "embarrassed": Emotion("self", "a lighter view of the moment", (
        "My face went bright red",
        "Everyone was staring at me",
        "I wanted the floor to swallow me"), (
        Scenario("They tripped on stage during a school assembly.",
                 "tripping on stage at the assembly",
                 "I tripped on stage in front of the whole school."),
        Scenario("They called their teacher mom in front of the class.",
                 "calling your teacher mom in class",
                 "I called my teacher mom in front of the entire class."))),
    "content": Emotion("positive", "time to savor it", (
        "Nothing big, just a calm good day",
        "I have everything I need right now",
        "I am at peace with how things are"), (
        Scenario("They spent a quiet Sunday reading in their garden.",
                 "enjoying a quiet Sunday in your garden",
                 "I spent a quiet Sunday reading in my garden."),
        Scenario("They finally settled into a steady routine after a busy year.",
                 "settling into a steady routine",
                 "After a busy year I finally have a steady routine."))),
    "devastated": Emotion("sadness", "patience and support", (
        "My world fell apart",
        "I cannot stop crying",
        "I do not know how to go on"), (
        Scenario("Their house burned down in a fire.",
                 "losing your house in a fire",
                 "Our house burned down last week."),
        Scenario("Their engagement ended suddenly.",
                 "having your engagement end suddenly",
                 "My fiance called off our engagement."))),
    "sentimental": Emotion("sadness", "space to treasure the memory", (
        "I teared up holding it",
        "It means more to me than anything",
        "I keep it by my bed"), (
        Scenario("They found a letter their late grandfather wrote them.",
                 "reading a letter from your late grandfather",
                 "I found a letter my late grandfather wrote to me."),
        Scenario("Their son gave them his first drawing.",
                 "receiving your son's first drawing",
                 "My son gave me the first drawing he ever made."))),
    "caring": Emotion("positive", "ways to look after them and yourself", (
        "I just want to make sure they are okay",
        "I made soup and brought it over",
        "I check on them every morning"), (
        Scenario("Their elderly neighbor fell and they are helping her recover.",
                 "helping your elderly neighbor recover",
                 "My elderly neighbor fell and I am helping her out."),
        Scenario("Their little brother has the flu and they are looking after him.",
                 "looking after your little brother with the flu",
                 "My little brother has the flu and I am looking after him."))),
    "trusting": Emotion("positive", "confirmation that your trust is well placed", (
        "I gave them my spare key without a second thought",
        "I know they have my back",
        "I would leave my kids with them any day"), (
        Scenario("They let their friend manage their savings while they travel.",
                 "letting your friend handle your savings",
                 "I am letting my friend manage my savings while I travel."),
        Scenario("They are letting their teenage son drive the family car alone.",
                 "letting your son drive the car alone",
                 "My teenage son is driving the family car alone for the first time."))),
    "ashamed": Emotion("self", "kindness toward yourself", (
        "I cannot believe I did that",
        "I hid it from everyone",
        "I feel so small"), (
        Scenario("They lied to their partner about losing money gambling.",
                 "having lied about losing money gambling",
                 "I lied to my partner about money I lost gambling."),
        Scenario("They cheated on a test and their teacher found out.",
                 "being caught cheating on a test",
                 "My teacher found out I cheated on a test."))),
    "apprehensive": Emotion("fear", "a clear picture of what to expect", (
        "I am not sure it is a good idea",
        "Something about it makes me hesitate",
        "I keep going back and forth"), (
        Scenario("They are about to have surgery on their knee.",
                 "facing knee surgery soon",
                 "I am having knee surgery next month."),
        Scenario("They agreed to go on a blind date.",
                 "going on a blind date",
                 "I agreed to go on a blind date on Saturday."))),
    "faithful": Emotion("positive", "support for your commitment", (
        "I have stood by them for ten years",
        "I would never give up on them",
        "We promised to stick together"), (
        Scenario("They have visited their friend in the hospital every week for a year.",
                 "visiting your friend in the hospital every week",
                 "I have visited my friend in the hospital every week for a year."),
        Scenario("They stayed with their struggling team through a losing season.",
                 "standing by your team through a losing season",
                 "I stayed with our team through the worst season ever."))),
}

EXPLICIT_FRAMES = ("Honestly, I feel {label}.", "If I had to name it, I would say {label}.",
                   "The only word I have for it is {label}.")
FOLLOW_UP_FRAMES = ("{cue}.", "{cue}, and I keep replaying it.", "Sorry, it is a lot. {cue}.",
                    "{filler} {cue}.", "Thanks for listening. {cue}.")
FILLERS = ("It has been a long week.", "I told my sister about it too.", "I am still thinking about it.",
           "I went for a walk to clear my head.")
UNDERSTANDING_FRAMES = ("You are {gist}.", "This is about {gist}.")
REASONING_CUE_FRAMES = ("'{cue}' points to {label}", "'{cue}' sounds {label}")
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
                    cue: str | None, xml_tags: bool) -> str:
    """Four short spans; `cue` is the cue of the user message being answered (None: the label was named)."""
    understanding = rng.choice(UNDERSTANDING_FRAMES).format(gist=scenario.gist)
    if cue is None:
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


def make_dialogue(rng: random.Random, label: str, scenario_index: int, persona: Persona, anon_username: str,
                  names_emotion: bool, xml_tags: bool) -> dict:
    """One KardiaBench-schema row. If `names_emotion`, the first user message names the feeling."""
    emotion = EMOTION_BANK[label]
    scenario = emotion.scenarios[scenario_index]
    cues = list(emotion.cues)
    rng.shuffle(cues)
    messages = [{"role": "system", "content": system_message(person_text(persona), scenario.situation,
                                                              anon_username)}]
    for pair in range(rng.choice(PAIRS_PER_DIALOGUE)):
        cue = cues[pair % len(cues)]
        if pair == 0:
            named = f" {rng.choice(EXPLICIT_FRAMES).format(label=label)}" if names_emotion else ""
            user = f"{scenario.opener}{named} {cue}."
        else:
            user = rng.choice(FOLLOW_UP_FRAMES).format(cue=_sentence(cue), filler=rng.choice(FILLERS))
        messages.append({"role": "user", "content": user})
        answered_cue = None if names_emotion and pair == 0 else cue
        messages.append({"role": "assistant", "content": _assistant_turn(rng, label, emotion, scenario, persona,
                                                                          answered_cue, xml_tags)})
    return {"person": person_text(persona), "mbti": persona.mbti, "emotion": label,
            "situation": scenario.situation, "anon_username": anon_username, "messages": messages}


def build_sample(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), deterministic in `seed`."""
    rng = random.Random(seed)
    persona_order = list(range(len(PERSONAS)))
    rng.shuffle(persona_order)
    test_personas, train_personas = persona_order[:NUM_TEST_PERSONAS], persona_order[NUM_TEST_PERSONAS:]
    usernames = {i: f"user_{rng.randrange(16 ** 6):06x}" for i in persona_order}

    test_labels = set(rng.sample(EMOTIONS, NUM_TEST_EMOTIONS))
    test_jobs, train_jobs = [], []  # (label, scenario index)
    for label in EMOTIONS:
        scenarios = [0, 1]
        rng.shuffle(scenarios)
        if label in test_labels:
            test_jobs.append((label, scenarios[0]))
            train_jobs.append((label, scenarios[1]))
        else:
            train_jobs.extend((label, s) for s in scenarios)

    splits = []
    for jobs, personas in ((train_jobs, train_personas), (test_jobs, test_personas)):
        rng.shuffle(jobs)
        names_emotion = [i % 2 == 0 for i in range(len(jobs))]
        rng.shuffle(names_emotion)
        rows = []
        for i, (label, scenario_index) in enumerate(jobs):
            persona_index = personas[i % len(personas)]
            rows.append(make_dialogue(rng, label, scenario_index, PERSONAS[persona_index], usernames[persona_index],
                                      names_emotion[i], rng.random() < XML_TAG_FRACTION))
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
