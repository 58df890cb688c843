"""The graph view: a transcoder graph's nodes by (layer, position) and its strongest links in one
self-contained HTML page (SVG and script inline, no network). Click a link for its head loadings
and, where computed, the QK attribution of the head that carried it; click a node for its
incoming links. It lays out :class:`qk_lens.graph.graph_view.GraphView`'s numbers only."""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

from qk_lens.display import register
from qk_lens.views.html import json_script, page

CSS = """
.qkg{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
  line-height:1.4;max-width:1600px;margin:0 auto;padding:0 1em}
.qkg h1{font-size:1.4em;margin:.5em 0}
.qkg .main{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}
.qkg svg{border:1px solid #ccc;background:#fff}
.qkg line.hit{stroke:transparent;stroke-width:7;cursor:pointer}
.qkg circle{cursor:pointer;stroke:#333;stroke-width:.5}
.qkg table{border-collapse:collapse;font-size:.85em;margin:.3em 0}
.qkg td,.qkg th{border:1px solid #ddd;padding:.15em .4em;text-align:left}
.qkg td.num{text-align:right;font-variant-numeric:tabular-nums}
.qkg .note{color:#666;font-size:.85em}
.qkg .detail{min-width:360px;max-width:640px}
.qkg a{cursor:pointer;color:#2166ac}
"""

SCRIPT = r"""
(function(){
const root = document.getElementById(ROOT_ID);
const D = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
const T = D.tokens.length, L = D.n_layers;
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const fmt = (x) => x === null ? '' : (Math.abs(x) >= 1000 || (Math.abs(x) < 0.001 && x !== 0) ? x.toExponential(3) : x.toFixed(4));
const pct = (x) => x === null ? '' : (100 * x).toFixed(1) + '%';
const colW = Math.max(60, Math.min(110, 1100 / T)), rowH = 56, W = 60 + colW * T, Hh = rowH * (L + 3);
const row = (n) => n[1] === 'embedding' ? L + 1 : (n[1] === 'logit' ? 0 : L - n[2]);
// place the nodes of each (row, position) side by side inside their column
const groups = new Map();
D.nodes.forEach((n, i) => { const key = row(n) + ',' + n[3]; if (!groups.has(key)) groups.set(key, []); groups.get(key).push(i); });
const xy = new Array(D.nodes.length);
for (const [key, ids] of groups) { const [r, p] = key.split(',').map(Number);
  ids.forEach((i, j) => { xy[i] = [50 + p * colW + (j + 1) * colW / (ids.length + 1), 30 + r * rowH + (j % 2) * 8]; }); }
const colour = {feature: '#f2b134', error: '#999999', embedding: '#59a14f', logit: '#e15759'};
let big = 0; for (const l of D.links) big = Math.max(big, Math.abs(l[2]));
let s = '<svg width="' + W + '" height="' + Hh + '" viewBox="0 0 ' + W + ' ' + Hh + '">';
for (let p = 0; p < T; p++) s += '<text x="' + (50 + (p + 0.5) * colW) + '" y="' + (Hh - 6) + '" font-size="11" text-anchor="middle">' + esc(D.tokens[p]) + '</text>';
for (let r = 0; r <= L + 1; r++) s += '<text x="4" y="' + (34 + r * rowH) + '" font-size="10" fill="#777">' + (r === 0 ? 'logits' : r === L + 1 ? 'emb' : 'L' + (L - r)) + '</text>';
D.links.forEach((l, i) => { const a = xy[l[0]], b = xy[l[1]], t = big ? Math.abs(l[2]) / big : 0;
  s += '<line x1="' + a[0] + '" y1="' + a[1] + '" x2="' + b[0] + '" y2="' + b[1] + '" stroke="' + (l[2] >= 0 ? '#2166ac' : '#b2182b') + '" stroke-opacity="' + (0.08 + 0.9 * t).toFixed(3) + '" stroke-width="' + (0.5 + 3 * t).toFixed(2) + '"/>';
  s += '<line class="hit" data-link="' + i + '" x1="' + a[0] + '" y1="' + a[1] + '" x2="' + b[0] + '" y2="' + b[1] + '"/>'; });
D.nodes.forEach((n, i) => { s += '<circle data-node="' + i + '" cx="' + xy[i][0] + '" cy="' + xy[i][1] + '" r="4.5" fill="' + colour[n[1]] + '"><title>' + esc(n[0] + ' ' + n[4]) + '</title></circle>'; });
root.querySelector('.canvas').innerHTML = s + '</svg>';
const detail = root.querySelector('.detail');
const name = (i) => esc(D.nodes[i][0]) + ' <span class="note">' + esc(D.nodes[i][4]) + '</span>';
function showLink(i) {
  const l = D.links[i];
  let h = '<h2 class="edge">' + name(l[0]) + ' → ' + name(l[1]) + '</h2><p>edge <b class="weight">' + fmt(l[2]) + '</b> = residual ' + fmt(l[3]) + ' + mlp ' + fmt(l[4]) + ' + multi-head ' + fmt(l[5]) + ' + Σ heads</p>';
  h += '<table class="heads"><tr><th>layer</th><th>head</th><th>loading</th><th>share</th></tr>' + l[6].map((x) => '<tr><td>' + x[0] + '</td><td>' + x[1] + '</td><td class="num">' + fmt(x[2]) + '</td><td class="num">' + (l[2] ? pct(x[2] / l[2]) : '') + '</td></tr>').join('') + '</table>';
  if (l[7] >= 0) { const q = D.qk[l[7]];
    h += '<h3 class="qk">why L' + q[0] + 'H' + q[1] + ' attends from ' + q[2] + ' ' + esc(JSON.stringify(D.tokens[q[2]])) + ' to ' + q[3] + ' ' + esc(JSON.stringify(D.tokens[q[3]])) + '</h3><p>score ' + fmt(q[4]) + ', attention ' + fmt(q[5]) + '</p><table class="qkterms"><tr><th>query part</th><th>key part</th><th>term</th><th>share</th></tr>' + q[6].map((t) => '<tr><td>' + esc(t[0]) + '</td><td>' + esc(t[1]) + '</td><td class="num">' + fmt(t[2]) + '</td><td class="num">' + pct(t[3]) + '</td></tr>').join('') + '</table>'; }
  else if (D.nodes[l[0]][3] !== D.nodes[l[1]][3]) h += '<p class="note">QK attribution not precomputed for this link (loadings.qk_attribution(edge) gives it).</p>';
  detail.innerHTML = h;
}
function showNode(i) {
  const inc = D.links.map((l, j) => [l, j]).filter(([l]) => l[1] === i).sort((a, b) => Math.abs(b[0][2]) - Math.abs(a[0][2]));
  detail.innerHTML = '<h2>' + name(i) + '</h2><p>' + inc.length + ' incoming links shown</p><table class="incoming">' + inc.slice(0, 30).map(([l, j]) => '<tr><td><a data-link="' + j + '">' + name(l[0]) + '</a></td><td class="num">' + fmt(l[2]) + '</td></tr>').join('') + '</table>';
  detail.querySelectorAll('a[data-link]').forEach((a) => a.addEventListener('click', () => showLink(+a.dataset.link)));
}
root.querySelectorAll('line.hit').forEach((el) => el.addEventListener('click', () => showLink(+el.dataset.link)));
root.querySelectorAll('circle').forEach((el) => el.addEventListener('click', () => showNode(+el.dataset.node)));
detail.innerHTML = '<p class="note">Click a link for its head loadings (and why the head attended); click a node for its incoming links.</p>';
root.dataset.ready = '1';
})();
"""


@register("graph_view")
def graph_view_html(payload: dict[str, Any], fragment: bool = False) -> str:
    """The page (``fragment``: the element alone, for a notebook cell)."""
    root_id = f"qkg-{uuid.uuid4().hex[:12]}"
    title = html.escape(str(payload.get("title", "graph")))
    body = (
        f'<div class="qkg" id="{root_id}"><style>{CSS}</style><h1>{title}</h1>'
        f'<p class="note">{len(payload["nodes"])} nodes; the {len(payload["links"])} strongest of '
        f"{payload['n_edges']} links (blue positive, red negative).</p>"
        '<div class="main"><div class="canvas"></div><div class="detail"></div></div>'
        f"{json_script(payload)}"
        f"<script>{SCRIPT.replace('ROOT_ID', json.dumps(root_id))}</script></div>"
    )
    return page(body, title, fragment)
