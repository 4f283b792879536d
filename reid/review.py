"""The review page: one self-contained HTML file (thumbnails inside it) that shows each query photo next to its
candidates' best-matching catalogue photos; a person confirms one candidate, marks a new individual or leaves the
photo, and saves the decisions as the CSV `reid enroll` reads. Works offline, from file://."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import cv2
import pandas as pd

from .data import decode
from .files import write_text

THUMB = 180  # pixels on the long side


def thumbnail(path: str | Path) -> str:
    """A small JPEG of the photo as a data: URL, or '' when it cannot be read."""
    try:
        img = decode(path, 4)
    except Exception:  # noqa: BLE001 - a missing thumbnail must not stop the page
        return ""
    h, w = img.shape[:2]
    f = THUMB / max(h, w)
    img = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode() if ok else ""


SCRIPT = """
function decisions() {
  const rows = [["image", "individual_id", "species"]];
  for (const q of document.querySelectorAll(".query")) {
    const pick = q.querySelector("input[type=radio]:checked");
    if (!pick || pick.value === "") continue;
    if (pick.value === "__new__") {
      const id = q.querySelector("input.newid").value.trim();
      if (id) rows.push([q.dataset.image, id, ""]);
    } else {
      rows.push([q.dataset.image, pick.value, pick.dataset.species]);
    }
  }
  return rows.map(r => r.map(v => /[",\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v).join(",")).join("\\n")
    + "\\n";
}
function save() {
  const csv = decisions();
  document.getElementById("saved").textContent = csv;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([csv], {type: "text/csv"}));
  a.download = "decisions.csv";
  document.body.appendChild(a);
  a.click();
  a.remove();
}
"""

STYLE = """
body{font-family:sans-serif;margin:1.5em;background:#fafafa}
.query{display:flex;gap:10px;align-items:flex-start;background:#fff;border:1px solid #ddd;padding:8px;margin:8px 0}
figure{margin:0;width:190px;text-align:center;font-size:12px}
figure img{max-width:180px;max-height:180px;display:block;margin:auto}
figure.q{border-right:2px solid #888;padding-right:10px}
.new{color:#b00}
label{display:block;cursor:pointer}
button{font-size:16px;padding:6px 16px}
pre#saved{background:#eee;padding:6px}
"""


def review_page(candidates: pd.DataFrame, queries: dict[str, str], path: Path, threshold: float | None = None
                ) -> Path:
    """Write the page for `candidates` (identify's table: image, rank, individual_id, species, similarity,
    best_photo, likely_new) with `queries` {image name: photo path}."""
    blocks = []
    for image, rows in candidates.groupby("image", sort=False):
        rows = rows.sort_values("rank")
        likely_new = bool(rows.likely_new.iloc[0])
        name = html.escape(str(image))
        cells = [f'<figure class="q"><img src="{thumbnail(queries.get(image, ""))}" alt="query {name}">'
                 f"<figcaption><b>{name}</b>"
                 f"{'<br><span class=new>likely a new individual</span>' if likely_new else ''}</figcaption>"
                 f'<label><input type="radio" name="{name}" value="" checked> leave</label>'
                 f'<label><input type="radio" name="{name}" value="__new__"> new individual:</label>'
                 f'<input class="newid" size="14" placeholder="new id"></figure>']
        for r in rows.itertuples():
            ind, sp = html.escape(str(r.individual_id)), html.escape(str(r.species))
            cells.append(f'<figure class="cand"><img src="{thumbnail(r.best_photo)}" alt="{ind}">'
                         f"<figcaption>#{r.rank} <b>{ind}</b><br>{sp}<br>similarity {r.similarity:.3f}</figcaption>"
                         f'<label><input type="radio" name="{name}" value="{ind}" data-species="{sp}"> confirm'
                         f"</label></figure>")
        blocks.append(f'<div class="query" data-image="{name}">{"".join(cells)}</div>')
    note = f" Photos below similarity {threshold:.3f} are flagged as likely new." if threshold is not None else ""
    page = (f"<!doctype html><meta charset='utf-8'><title>reid review</title><style>{STYLE}</style>"
            f"<h1>Review {len(blocks)} photo(s)</h1><p>Confirm the right candidate, mark a new individual, or leave "
            f"the photo. <b>Save</b> downloads decisions.csv for <code>reid enroll</code>.{html.escape(note)}</p>"
            f"{''.join(blocks)}<p><button id='save' onclick='save()'>Save decisions</button></p>"
            f"<pre id='saved'></pre><script>{SCRIPT}</script><script type='application/json' id='data'>"
            f"{html.escape(json.dumps({'photos': len(blocks)}))}</script>")
    return write_text(path, page)
