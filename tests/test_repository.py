"""The repository speaks of the product: no words about how its development was organised, anywhere in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a user cannot act on: work rounds, the machines the work ran on, the tracker
ROUND = "sess" + "ion"  # spelt in parts, here and below, so that this file passes its own scan
PROCESS = re.compile(rf"\bstops? \d+\b|\bstop \d+'s\b|\b(?:this|an?|earlier|later|next|one) {ROUND}s?\b|"
                     rf"\b{ROUND}'s\b|\blent (?:machine|GPU)s?\b|\bthe issue\b|\bissue's\b|\bthe CEO\b", re.I)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if not n.endswith((".jpg", ".png", ".pt", ".whl"))]


def test_process_words_are_caught():
    for parts in (("as measured in", "stop", "41"), ("an earlier", ROUND + "'s", "machine"), ("the", "lent", "GPU"),
                  ("the", "iss" + "ue's", "list")):
        assert PROCESS.search(" ".join(parts)), parts
    for text in (f'scope="{ROUND}"', "a stop word", "step decay", f"the {ROUND} fixture"):
        assert not PROCESS.search(text), text


def test_no_process_words_in_the_repository():
    found = []
    for path in tracked_text_files():
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if m := PROCESS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)!r}")
    assert not found, "process words:\n" + "\n".join(found[:40])
