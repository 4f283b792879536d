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


def test_faiss_comes_from_one_extra_never_two():
    """faiss-cpu and faiss-gpu install the same module: the base install holds neither, each extra one of them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def faiss(reqs: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].strip() for r in reqs if r.startswith("faiss")}

    assert faiss(project["dependencies"]) == set()
    assert faiss(project["optional-dependencies"]["cpu"]) == {"faiss-cpu"}
    assert faiss(project["optional-dependencies"]["gpu"]) == {"faiss-gpu"}
    assert all(not faiss(reqs) for name, reqs in project["optional-dependencies"].items() if name not in ("cpu", "gpu"))
    assert 'pip install -q -e ".[$(strip $(FAISS)),dev]"' in (ROOT / "Makefile").read_text()


def test_a_missing_faiss_says_which_extra_to_install(monkeypatch):
    import sys

    import numpy as np
    import pytest

    from reid.errors import ReidError
    from reid.retrieval import build_index

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if neither extra were installed
    with pytest.raises(ReidError, match=r"faiss is not installed: pip install -e '\.\[cpu\]'"):
        build_index(np.eye(4, dtype=np.float32))


def test_no_class_holds_every_concern_and_only_the_cli_imports_train():
    """Each concern in a part a newcomer can find: no class over 200 lines, and run-folder loading, thresholds and
    the rest live in their own modules, so that predict and the catalogue never reach into train."""
    import ast

    big, importers = [], []
    for path in sorted((ROOT / "reid").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 200:
                big.append(f"{path.name}: {node.name}, {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.ImportFrom) and node.module in ("train", "reid.train"):
                importers.append(path.name)
    assert not big, big
    assert importers == ["cli.py"]
