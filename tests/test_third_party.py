"""third_party/: the label list kept there is the one the code uses, and every repository path its
README and notices name exists (so they stay true when files move)."""

import glob
import os
import re

from kardia_jax.spans import EMOTIONS

ROOT = os.path.join(os.path.dirname(__file__), "..")
THIRD_PARTY = os.path.join(ROOT, "third_party")


def test_empathetic_dialogues_labels_match_the_code():
    with open(os.path.join(THIRD_PARTY, "empathetic_dialogues", "labels.txt"), encoding="utf-8") as f:
        assert tuple(f.read().split("\n")[:-1]) == EMOTIONS
    assert len(EMOTIONS) == 32


def test_named_repository_paths_exist():
    notices = [os.path.join(THIRD_PARTY, "README.md"), *glob.glob(os.path.join(THIRD_PARTY, "*", "NOTICE.md"))]
    assert len(notices) == 4
    named = set()
    for notice in notices:
        text = open(notice, encoding="utf-8").read()
        named |= set(re.findall(r"`((?:kardia_jax|scripts|tests)/[\w./-]*?)(?:/?\{[^}]*\}[\w.]*)?`", text))
    assert "kardia_jax/spans.py" in named and "scripts/make_sample_data.py" in named  # the check looks
    missing = [path for path in sorted(named) if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"third_party/ names paths that do not exist: {missing}"
