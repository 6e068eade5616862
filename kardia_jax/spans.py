"""The four Kardia-R1 spans, their marker tokens and the 32 emotion labels.

An assistant turn is
  <|understanding_begin|>…<|understanding_end|><|reasoning_begin|>…<|reasoning_end|>
  <|emotion_begin|>…<|emotion_end|><|response_begin|>…<|response_end|>
and each of the eight markers is a single special token in every tokenizer kardia_jax uses.
"""

SPAN_NAMES = ("understanding", "reasoning", "emotion", "response")

# (begin, end) marker strings per span, in output order.
SPAN_MARKERS = {name: (f"<|{name}_begin|>", f"<|{name}_end|>") for name in SPAN_NAMES}

# The eight markers, flattened in output order: understanding_begin, understanding_end, reasoning_begin, ...
MARKER_TOKENS = tuple(m for name in SPAN_NAMES for m in SPAN_MARKERS[name])

# The 32 EmpatheticDialogues emotion labels used by KardiaBench.
EMOTIONS = (
    "surprised", "excited", "annoyed", "proud", "angry", "sad", "grateful", "lonely",
    "impressed", "afraid", "disgusted", "confident", "terrified", "hopeful", "anxious", "disappointed",
    "joyful", "prepared", "guilty", "furious", "nostalgic", "jealous", "anticipating", "embarrassed",
    "content", "devastated", "sentimental", "caring", "trusting", "ashamed", "apprehensive", "faithful",
)


def normalize_emotion(text: str) -> str:
    """Case- and whitespace-normalized emotion label ("  Anxious\n" -> "anxious")."""
    return " ".join(text.split()).lower()


_XML_STYLE = {f"<{name}>": SPAN_MARKERS[name][0] for name in SPAN_NAMES} | {
    f"</{name}>": SPAN_MARKERS[name][1] for name in SPAN_NAMES
}


def normalize_tags(text: str) -> str:
    """Rewrites `<understanding>…</understanding>`-style tags to the `<|understanding_begin|>` markers."""
    for tag, marker in _XML_STYLE.items():
        text = text.replace(tag, marker)
    return text


def parse_spans(text: str) -> dict[str, str] | None:
    """The four spans of an assistant turn, or None if it is not well formed.

    Well formed (the paper's format reward): every marker appears exactly once, the spans come in the
    order understanding, reasoning, emotion, response, each span has non-whitespace content, and only
    whitespace lies outside the spans. Both tag styles are accepted. Span texts are stripped.
    """
    text = normalize_tags(text)
    if any(text.count(marker) != 1 for marker in MARKER_TOKENS):
        return None
    spans, cursor = {}, 0
    for name in SPAN_NAMES:
        begin, end = SPAN_MARKERS[name]
        start = text.index(begin)
        stop = text.index(end)
        if start < cursor or stop < start or text[cursor:start].strip():
            return None
        content = text[start + len(begin):stop].strip()
        if not content:
            return None
        spans[name] = content
        cursor = stop + len(end)
    if text[cursor:].strip():
        return None
    return spans


def join_spans(spans: dict[str, str], names: tuple[str, ...] = SPAN_NAMES) -> str:
    """The canonical marker text of the spans `names` (all four: the inverse of `parse_spans`)."""
    return "".join(f"{SPAN_MARKERS[n][0]}{spans[n]}{SPAN_MARKERS[n][1]}" for n in names)
