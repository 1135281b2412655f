"""Report page: one self-contained index.html (inline CSS, no network) over PNG files in figures/.

A small inline script marks every image that failed to load (class `broken`, a red outline) and records the
counts on <body> (data-images, data-images-broken), so a headless browser's DOM dump shows whether the
page rendered whole.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from ctrpipe.errors import human_bytes
from ctrpipe.report.leaderboard import COLUMNS, Leaderboard
from ctrpipe.report.rundata import RunData
from ctrpipe.report.stats import ReliabilityBins

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'DejaVu Sans', Arial, sans-serif; margin: 24px 32px;
       color: #1d1d1f; background: #fff; max-width: 1500px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 6px; border-top: 1px solid #ddd;
padding-top: 16px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #666; margin: 0 0 16px; }
table { border-collapse: collapse; margin: 8px 0; } caption { text-align: left; color: #444; padding: 4px 0; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f2f4f7; } td.txt, th.txt { text-align: left; }
td.best { background: #dff3e2; font-weight: 600; } td.best::before { content: "\\2605 "; color: #1a7f37; }
tr.baseline td { box-shadow: inset 0 2px 0 #4063d8, inset 0 -2px 0 #4063d8; }
tr.unranked td { color: #888; background: #fafafa; } .badge { font-size: 11px; padding: 1px 5px; border-radius: 3px;
background: #fde8e8; color: #a11; } .base { background: #e3e9fb; color: #233c99; }
.delta { display: block; font-size: 11px; font-weight: 400; } .good { color: #1a7f37; } .worse { color: #c0392b; }
.na { color: #999; } figure { margin: 10px 0 18px; } figcaption { color: #555; font-size: 12px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; } img.broken { outline: 4px solid red; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 6px 0; } dt { color: #666; }
dd { margin: 0; } code { font-size: 12px; } details { margin: 6px 0 12px; } ul.notes { color: #8a5a00; margin: 4px 0; }
"""

IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  broken.forEach(function (i) { i.classList.add("broken"); });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-images-broken", String(broken.length));
});
</script>
"""


@dataclass(frozen=True)
class FigureRef:
    src: str            # path relative to index.html, e.g. "figures/run0_training.png"
    alt: str
    caption: str
    width: int          # pixels
    height: int


@dataclass(frozen=True)
class RunSection:
    run: RunData
    anchor: str
    figures: tuple[FigureRef, ...]
    bins: tuple[tuple[str, ReliabilityBins], ...]


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_page(title: str, board: Leaderboard, comparison: FigureRef | None, sections: Sequence[RunSection],
                generated: str) -> str:
    """The whole page as one HTML string."""
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class='sub'>{len(sections)} run(s); generated {e(generated)}</p>",
             _leaderboard(board, {s.run.name: s.anchor for s in sections})]
    if comparison is not None:
        parts += ["<h3>All runs</h3>", _figure(comparison)]
    parts += [_section(s) for s in sections]
    parts += [IMAGE_CHECK, "</body></html>\n"]
    return "\n".join(parts)


def _leaderboard(board: Leaderboard, anchors: dict[str, str]) -> str:
    head = "".join(f"<th>{e(c.title)}</th>" for c in COLUMNS)
    rows = []
    for i, entry in enumerate(board.entries):
        run = entry.run
        classes = [c for c, on in (("baseline", run is board.baseline), ("unranked", not entry.comparable)) if on]
        rank = str(sum(1 for x in board.entries[:i + 1] if x.comparable)) if entry.comparable else "–"
        note = "<span class='badge base'>baseline</span>" if run is board.baseline else ""
        if entry.reason:
            note += f"<span class='badge'>not ranked</span> {e(entry.reason)}"
        cells = [f"<td>{rank}</td>", f"<td class='txt'><a href='#{anchors[run.name]}'>{e(run.name)}</a></td>",
                 f"<td class='txt'>{e(run.model)}{' ×' + str(run.kfold) + ' folds' if run.kfold else ''}</td>"]
        cells += [_cell(board, i, c) for c in range(len(COLUMNS))]
        cells += [f"<td class='txt'><code>{e(run.manifest_fingerprint[:12])}</code></td>",
                  f"<td class='txt'>{note}</td>"]
        rows.append(f"<tr class='{' '.join(classes)}'>{''.join(cells)}</tr>")
    cache = e(board.baseline.manifest_fingerprint[:12])
    caption = (f"Scored on the <b>{e(board.split_title)}</b> of cache <code>{cache}</code>; baseline "
               f"<b>{e(board.baseline.name)}</b>. &#9733; best per column among ranked runs; "
               f"small figures: difference (metrics) or ratio (costs) to the baseline. "
               f"Multi-task runs: the heads' weighted mean.")
    return (f"<h2 id='leaderboard'>Leaderboard</h2><table class='leaderboard'><caption>{caption}</caption>"
            f"<thead><tr><th>#</th><th class='txt'>run</th><th class='txt'>model</th>{head}"
            f"<th class='txt'>cache</th><th class='txt'>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _cell(board: Leaderboard, i: int, c: int) -> str:
    col, v = COLUMNS[c], board.entries[i].values[c]
    if v is None:
        return f"<td class='na' title='{e(_missing(board.entries[i].run, col.key))}'>n/a</td>"
    text = col.text(v)
    if col.key == "peak_memory" and board.entries[i].run.resources.peak_memory_where:
        text += f" ({board.entries[i].run.resources.peak_memory_where})"
    d = board.delta(i, c)
    if d is not None:
        base = board.baseline_entry.values[c]
        better = _is_better(col.better, v, base)
        cls = "" if better is None else ("good" if better else "worse")
        shown = f"{d:+.4f}" if col.delta == "diff" else f"×{d:.2f}"
        text += f"<span class='delta {cls}'>{shown}</span>"
    best = " best" if i in board.best[c] else ""
    return f"<td class='num{best}'>{text}</td>"


def _is_better(better: str, v: float, base: float | None) -> bool | None:
    if base is None or v == base:
        return None
    if better == "high":
        return v > base
    if better == "low":
        return v < base
    return abs(v - 1.0) < abs(base - 1.0)


def _missing(run: RunData, key: str) -> str:
    if key == "parameters":
        return f"no parameter count: {run.resources.parameters_from}"
    if key in ("peak_memory", "wall_seconds") and run.resources.partial:
        return run.resources.partial
    fields = {"peak_memory": "peak_device_memory_bytes / peak_host_anon_bytes / peak_host_memory_bytes",
              "wall_seconds": "wall_seconds",
              "samples_per_s": "samples_per_s", "train_seconds": "train_seconds"}
    return f"metrics.json has no {fields.get(key, key)}" if key in fields else "not recorded for this split"


def _figure(f: FigureRef) -> str:
    return (f"<figure><img src='{e(f.src)}' alt='{e(f.alt)}' width='{f.width}' height='{f.height}'>"
            f"<figcaption>{e(f.caption)}</figcaption></figure>")


def _section(s: RunSection) -> str:
    run, res = s.run, s.run.resources
    facts = [("directory", f"<code>{e(run.path)}</code>"), ("model", e(run.model)), ("heads", e(", ".join(run.heads))),
             ("cache", f"<code>{e(run.manifest_fingerprint[:12])}</code>"),
             ("steps", e(run.steps if run.steps is not None else "n/a")),
             ("best step", e(run.best_step if run.best_step is not None else "n/a")),
             ("K-fold", e(run.kfold or "no")),
             ("parameters", e(f"{res.parameters:,} (from {res.parameters_from})" if res.parameters is not None
                              else f"n/a ({res.parameters_from})")),
             ("peak memory", e(f"{human_bytes(res.peak_memory_bytes)} ({res.peak_memory_where})"
                               if res.peak_memory_bytes else "n/a")),
             ("predictions", e(run.predictions_from or "none"))]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    notes = "".join(f"<li>{e(n)}</li>" for n in run.notes)
    parts = [f"<h2 id='{e(s.anchor)}'>{e(run.name)} <small>({e(run.model)})</small></h2>", f"<dl>{dl}</dl>"]
    if notes:
        parts.append(f"<ul class='notes'>{notes}</ul>")
    parts += [_figure(f) for f in s.figures]
    parts += [_bins_table(head, b) for head, b in s.bins]
    return "\n".join(parts)


def _bins_table(head: str, b: ReliabilityBins) -> str:
    rows = "".join(f"<tr><td>{lo:.4f} – {hi:.4f}</td><td>{c:,}</td><td>{mp:.4f}</td><td>{pr:.4f}</td></tr>"
                   for lo, hi, c, mp, pr in zip(b.lo, b.hi, b.count, b.mean_pred, b.pos_rate, strict=True))
    return (f"<details><summary>reliability bins: {e(head)}</summary><table class='bins'><thead><tr>"
            f"<th>prediction range</th><th>rows</th><th>mean prediction</th><th>observed rate</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")
