"""The map as one self-contained HTML page (``map.html``): the UMAP points as SVG, coloured by given label, the
audit's flags marked, and on hover the item itself (a thumbnail for images, the first words for texts) with its path,
split, labels and flags. No script library, no network: a few lines of inline JavaScript show the hovered point's
preview. Previews are read from the store's recorded source (``heads.records.store_records``, every file checked
against its content id); where the source is not there the page says so and shows paths only.

A thumbnail is a :data:`THUMBNAIL_PX`-pixel PNG inline (about 0.5-1.5 kB for Fashion-MNIST); previews are made for
at most :data:`PREVIEW_MAX_ROWS` points (the flagged ones first), which keeps the page under a few MB.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import FeaturestoreError
from ..store.hdf5 import FeatureStore
from ..utils.atomic import write_text_atomic

log = logging.getLogger("featurestore")

THUMBNAIL_PX = 64
SNIPPET_CHARS = 280
PREVIEW_MAX_ROWS = 5_000
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")


def thumbnail(path: Path) -> str:
    """A data URI of the image at ``path`` shrunk to fit :data:`THUMBNAIL_PX` pixels (PNG)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16") else "RGB")  # grey stays small
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def snippet(text: str) -> str:
    """The first :data:`SNIPPET_CHARS` characters of a text, whitespace folded."""
    folded = " ".join(text.split())
    return folded if len(folded) <= SNIPPET_CHARS else folded[:SNIPPET_CHARS] + "…"


def item_previews(store: FeatureStore, splits: np.ndarray, paths: np.ndarray, rows: np.ndarray) -> list[str | None]:
    """For each index of ``rows`` into the audit's rows (``splits``/``paths`` (N,) str), a thumbnail data URI (images)
    or a snippet (texts); None for all when the store's source cannot be read (logged once)."""
    from ..encode.texts import item_text
    from ..heads.records import store_records

    text = store.fingerprint.get("kind") == "text"
    try:
        by_path = {(split, record.rel_path): record for split in store.splits
                   for record in store_records(store, split)}
        previews = []
        for row in rows:
            record = by_path[(str(splits[row]), str(paths[row]))]
            if text:
                previews.append(snippet(item_text(record)))
            else:
                previews.append(thumbnail(record.path))
        return previews
    except (FeaturestoreError, OSError, KeyError) as exc:
        log.warning("%s: the map page shows paths only: its items cannot be read (%s)", store.path, exc)
        return [None] * len(rows)


def write_map_page(out: str | Path, coordinates: np.ndarray, labels: np.ndarray, suggested: np.ndarray,
                   class_names: list[str], splits: np.ndarray, paths: np.ndarray, issues: np.ndarray,
                   duplicates: np.ndarray, previews: list[str | None], title: str) -> Path:
    """Write the page: one point per row of ``coordinates`` (M, 2) float; ``labels``/``suggested`` (M,) class indices;
    ``splits``/``paths`` (M,) str; ``issues``/``duplicates`` (M,) bool; ``previews`` (M,) data URIs, snippets or None.
    Atomic. Returns ``out``."""
    size, pad = 760, 12
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    scaled = pad + (coordinates - low) / np.where(high > low, high - low, 1) * (size - 2 * pad)
    points = []
    for i, (x, y) in enumerate(scaled):
        colour = PALETTE[int(labels[i]) % len(PALETTE)]
        mark = ' stroke="#000" stroke-width="1.5"' if issues[i] else (
            ' stroke="#d00" stroke-width="1.5"' if duplicates[i] else "")
        points.append(f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="{4 if issues[i] or duplicates[i] else 2.5}" '
                      f'fill="{colour}"{mark} data-i="{i}"/>')
    items = [{"path": str(paths[i]), "split": str(splits[i]), "given": class_names[int(labels[i])],
              "suggested": class_names[int(suggested[i])], "issue": bool(issues[i]), "duplicate": bool(duplicates[i]),
              "preview": previews[i]} for i in range(len(paths))]
    legend = "".join(f'<span><i style="background:{PALETTE[k % len(PALETTE)]}"></i>{html.escape(name)}</span>'
                     for k, name in enumerate(class_names))
    page = PAGE.format(title=html.escape(title), size=size, points="\n".join(points), legend=legend,
                       items=json.dumps(items).replace("</", "<\\/"))
    return write_text_atomic(out, page)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; }}
#map {{ border: 1px solid #ccc; }}
#card {{ position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 6px; max-width: 320px;
         box-shadow: 2px 2px 6px #0003; pointer-events: none; }}
#card img {{ image-rendering: pixelated; width: 128px; display: block; }}
.legend span {{ margin-right: 12px; white-space: nowrap; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
</style></head><body>
<h3>{title}</h3>
<p class="legend">{legend}<span>● black ring: label issue</span><span>● red ring: near-duplicate</span></p>
<svg id="map" width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">
{points}
</svg>
<div id="card"></div>
<script>
const items = {items};
const card = document.getElementById("card");
const esc = s => s.replace(/[&<>"]/g, c => ({{"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}})[c]);
document.getElementById("map").addEventListener("mousemove", event => {{
  const index = event.target.dataset.i;
  if (index === undefined) {{ card.style.display = "none"; return; }}
  const item = items[index];
  let preview = "";
  if (item.preview && item.preview.startsWith("data:image")) preview = `<img src="${{item.preview}}">`;
  else if (item.preview) preview = `<p>${{esc(item.preview)}}</p>`;
  const flags = [item.issue ? `label issue: suggested ${{esc(item.suggested)}}` : "",
                 item.duplicate ? "near-duplicate" : ""].filter(Boolean).join("; ");
  card.innerHTML = `${{preview}}<b>${{esc(item.path)}}</b><br>${{item.split}}, labelled ${{esc(item.given)}}` +
                   (flags ? `<br><i>${{flags}}</i>` : "");
  card.style.left = (event.clientX + 14) + "px";
  card.style.top = (event.clientY + 14) + "px";
  card.style.display = "block";
}});
</script></body></html>
"""
