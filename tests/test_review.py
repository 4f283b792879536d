"""The review page in a real headless browser (Debian's chromium): it shows every query with its candidates, and a
click on confirm, a new id and the save button give the CSV that `reid enroll` reads."""

from __future__ import annotations

import html
import re
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from reid.review import review_page
from tests.conftest import browse

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")

CLICKS = """<script>
window.addEventListener("load", () => {
  const [a, b] = document.querySelectorAll(".query");
  a.querySelectorAll("input[type=radio]")[3].click();            // confirm a's second candidate
  b.querySelector("input[value=__new__]").click();               // b is a new animal
  b.querySelector("input.newid").value = "whale, new";           // a comma: the CSV must quote it
  document.getElementById("save").click();
  document.title = "queries=" + document.querySelectorAll(".query").length
    + " candidates=" + document.querySelectorAll("figure.cand").length
    + " thumbs=" + [...document.images].filter(i => i.naturalWidth > 0).length;
});
</script>"""


def _photo(path, value):
    cv2.imwrite(str(path), np.full((60, 90, 3), value, np.uint8))
    return str(path)


def _table(tmp_path) -> tuple[pd.DataFrame, dict]:
    rows, queries = [], {}
    for q in range(3):
        queries[f"q{q}.jpg"] = _photo(tmp_path / f"q{q}.jpg", 40 * q)
        for r in range(5):
            rows.append({"image": f"q{q}.jpg", "rank": r + 1, "individual_id": f"id{q}{r}", "species": "beluga",
                         "similarity": 0.9 - 0.1 * r, "best_photo": _photo(tmp_path / f"c{q}{r}.jpg", 20 * r),
                         "likely_new": q == 2})
    return pd.DataFrame(rows), queries


@pytest.mark.skipif(BROWSER is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_review_page_renders_and_saves_the_decisions(tmp_path):
    table, queries = _table(tmp_path)
    page = review_page(table, queries, tmp_path / "review.html", threshold=0.5)
    text = page.read_text()
    assert "file://" not in text and text.count("data:image/jpeg;base64,") == 18  # self-contained
    clicked = tmp_path / "clicked.html"
    clicked.write_text(text.replace("</pre>", "</pre>" + CLICKS, 1))
    dom = browse(clicked, "--dump-dom")
    assert re.search(r"<title>queries=3 candidates=15 thumbs=18</title>", dom), dom[:500]
    saved = html.unescape(re.search(r'<pre id="saved">(.*?)</pre>', dom, re.S).group(1))
    assert saved == 'image,individual_id,species\nq0.jpg,id01,beluga\nq1.jpg,"whale, new",\n'
    from io import StringIO

    decisions = pd.read_csv(StringIO(saved), keep_default_na=False)
    assert decisions.individual_id.tolist() == ["id01", "whale, new"]  # what reid enroll reads
    browse(page, "--screenshot=" + str(tmp_path / "shot.png"), "--window-size=1300,900")
    assert (tmp_path / "shot.png").stat().st_size > 10_000
