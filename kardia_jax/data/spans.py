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
