"""The QK explorer page: one self-contained HTML file (data and script inline, no network, no
external assets) that opens in a browser, in Jupyter and in Colab.

It lays out what :class:`qk_lens.attribution.explorer.QKExplorer` computed and nothing else:
a head's attention pattern on a canvas (hover: the pair's attention and score); a click on a
(query, key) cell shows its top terms (table, and the query part × key part matrix, hover: the
term and its share of the score); a basis switch shows the same pair in another basis;
shift-click on a second key of the same query shows the contrast s(q, k₁) − s(q, k₂) split exactly
by query part (each part's q_a · k for both keys, as computed), then the two keys side by side;
the QK profile of the heads, when given, below.
"""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

from qk_lens.display import register
from qk_lens.views.html import json_script, page

CSS = """
.qkx{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
  line-height:1.4;max-width:1400px;margin:0 auto;padding:0 1em}
.qkx h1{font-size:1.4em;margin:.5em 0}
.qkx h2{font-size:1.1em;margin:1em 0 .4em;border-bottom:1px solid #ddd}
.qkx .bar{display:flex;gap:.4em;flex-wrap:wrap;align-items:center;margin:.4em 0}
.qkx button{border:1px solid #999;background:#f6f6f6;border-radius:4px;padding:.15em .6em;
  cursor:pointer;font:inherit}
.qkx button.on{background:#2166ac;color:#fff;border-color:#2166ac}
.qkx .main{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap}
.qkx canvas{border:1px solid #ccc;cursor:crosshair;image-rendering:pixelated}
.qkx table{border-collapse:collapse;font-size:.85em}
.qkx td,.qkx th{border:1px solid #ddd;padding:.15em .4em;text-align:left}
.qkx td.num{text-align:right;font-variant-numeric:tabular-nums}
.qkx .tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:.8em;
  padding:.2em .5em;border-radius:3px;display:none;z-index:10;white-space:nowrap}
.qkx .note{color:#666;font-size:.85em}
.qkx .side{display:flex;gap:1em;flex-wrap:wrap}
"""

# The script only places, colours and formats the numbers of the payload.
SCRIPT = r"""
(function(){
const root = document.getElementById(ROOT_ID);
const D = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
const T = D.tokens.length, H = D.heads.length;
const $ = (s) => root.querySelector(s);
const tip = $('.tip');
let head = 0, basis = D.bases[0], sel = null, second = null;
const patterns = D.patterns.map((b) => Uint8Array.from(atob(b), (c) => c.charCodeAt(0)));
const index = {};
for (const b of D.bases) { const m = new Map(); for (const c of D.cells[b]) m.set(c[0] + ',' + c[1] + ',' + c[2], c); index[b] = m; }
const cell = (h, q, k) => index[basis].get(D.heads[h] + ',' + q + ',' + k);
const fmt = (x) => x === null ? '' : (Math.abs(x) >= 1000 || (Math.abs(x) < 0.001 && x !== 0) ? x.toExponential(3) : x.toFixed(4));
const pct = (x) => x === null ? '' : (100 * x).toFixed(1) + '%';
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const tok = (i) => i + ' ' + JSON.stringify(D.tokens[i]);
const label = (i) => D.strings[D.parts[i][1]], kindOf = (i) => D.strings[D.parts[i][0]];
const canvas = $('canvas');
const px = Math.max(1, Math.floor(512 / T));
canvas.width = canvas.height = px * T;
function blue(v) { const a = v / 255; return 'rgb(' + Math.round(255 - a * (255 - 33)) + ',' + Math.round(255 - a * (255 - 102)) + ',' + Math.round(255 - a * (255 - 172)) + ')'; }
function draw() {
  const g = canvas.getContext('2d'), p = patterns[head];
  g.fillStyle = '#fff'; g.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const v = p[q * T + k]; if (v) { g.fillStyle = blue(v); g.fillRect(k * px, q * px, px, px); }
  }
  for (const [c, col] of [[sel, '#f28e2b'], [second, '#59a14f']]) if (c) { g.strokeStyle = col; g.lineWidth = Math.max(1, px / 4); g.strokeRect(c[1] * px, c[0] * px, px, px); }
  root.querySelectorAll('.heads button').forEach((b, i) => b.classList.toggle('on', i === head));
  root.querySelectorAll('.bases button').forEach((b) => b.classList.toggle('on', b.dataset.basis === basis));
}
function at(ev) { const r = canvas.getBoundingClientRect();  // the content box: inside the border
  const x = (ev.clientX - r.left - canvas.clientLeft) * canvas.width / canvas.clientWidth, y = (ev.clientY - r.top - canvas.clientTop) * canvas.height / canvas.clientHeight;
  const k = Math.floor(x / px), q = Math.floor(y / px); return (q >= 0 && q < T && k >= 0 && k < T) ? [q, k] : null; }
function showTip(ev, text) { tip.textContent = text; tip.style.display = 'block'; tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; }
canvas.addEventListener('mousemove', (ev) => { const a = at(ev); if (!a) { tip.style.display = 'none'; return; }
  const [q, k] = a, c = cell(head, q, k), p = patterns[head][q * T + k] / 255;
  showTip(ev, 'q ' + tok(q) + ' → k ' + tok(k) + ': attention ' + (c ? fmt(c[3]) : '≈' + p.toFixed(2)) + (c ? ', score ' + fmt(c[4]) : (k > q ? ' (masked)' : ' (below ' + D.min_prob + ')')));
});
canvas.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
canvas.addEventListener('click', (ev) => { const a = at(ev); if (!a) return;
  if (ev.shiftKey && sel && a[0] === sel[0] && a[1] !== sel[1]) second = a; else { sel = a; second = null; }
  draw(); detail();
});
function termsTable(c) {
  let s = '<table class="terms"><tr><th>#</th><th>query part</th><th>key part</th><th>term</th><th>share</th></tr>';
  for (const r of c[5]) {
    s += '<tr data-term="' + r[2] + '"><td>' + (r[4] < 0 ? '' : r[4] + 1) + '</td><td>' + esc(label(r[0])) + '</td><td>' + esc(label(r[1])) + '</td><td class="num">' + fmt(r[2]) + '</td><td class="num">' + pct(r[3]) + '</td></tr>'; }
  return s + '</table>';
}
function matrix(c) {
  const qs = [], ks = [], m = new Map();
  for (const r of c[5]) { if (r[4] < 0) continue; if (!qs.includes(r[0])) qs.push(r[0]); if (!ks.includes(r[1])) ks.push(r[1]); m.set(r[0] + ',' + r[1], r); }
  let big = 0; for (const r of m.values()) big = Math.max(big, Math.abs(r[2]));
  const name = (i) => esc(label(i)) + (kindOf(i) === 'feature' ? ' <span class="note">#' + D.parts[i][2] + '</span>' : '');
  let s = '<table class="matrix"><tr><th>query part \\ key part</th>' + ks.map((k) => '<th>' + name(k) + '</th>').join('') + '</tr>';
  for (const q of qs) { s += '<tr><th>' + name(q) + '</th>';
    for (const k of ks) { const r = m.get(q + ',' + k);
      if (!r) { s += '<td></td>'; continue; }
      const a = big ? Math.abs(r[2]) / big : 0, col = r[2] >= 0 ? '33,102,172' : '178,24,43';
      s += '<td class="num mcell" style="background:rgba(' + col + ',' + (0.15 + 0.85 * a).toFixed(3) + ')" data-term="' + r[2] + '" data-share="' + r[3] + '">' + fmt(r[2]) + '</td>'; }
    s += '</tr>'; }
  return s + '</table>';
}
function one(q, k) {
  const c = cell(head, q, k);
  const headline = 'L' + D.layer + 'H' + D.heads[head] + ', query ' + tok(q) + ' → key ' + tok(k) + ' (' + basis + ' basis)';
  if (!c) return '<p class="sel">' + esc(headline) + '</p><p class="note">' + (k > q ? 'masked: a query only reads earlier keys' : 'attention below ' + D.min_prob + ': no terms computed for this pair (model.qk_attribution gives them)') + '</p>';
  return '<p class="sel">' + esc(headline) + '</p><p>attention <b class="prob">' + fmt(c[3]) + '</b>, score <b class="score">' + fmt(c[4]) + '</b> = the terms below (top ' + D.top_k + ') + the remainder</p>' + termsTable(c) + '<h3>query parts × key parts</h3>' + matrix(c);
}
function contrast(q, k1, k2) {
  // s(q,k1) − s(q,k2) by query part: the parts are the same vectors for both keys
  const a = cell(head, q, k1), b = cell(head, q, k2), rows = ((D.query_rows || {})[basis] || {})[D.heads[head] + ',' + q];
  if (k2 > q) return '<p class="note">key ' + k2 + ' is masked: a query only reads earlier keys</p>';
  if (!a || !b) return '<p class="note">no exact split: both keys need attention ≥ ' + D.min_prob + ' (model.qk_attribution(...).contrast gives it)</p>';
  if (!rows || !a[6] || !b[6]) return '<p class="note">no exact split: this page was built without query marginals</p>';
  const d = a[4] - b[4];
  let s = '<p>s(q, ' + esc(tok(k1)) + ') − s(q, ' + esc(tok(k2)) + ') = <b class="delta">' + fmt(d) + '</b>, split by query part (exact: the rows sum to it)</p><table class="contrast"><tr><th>query part</th><th>· key ' + k1 + '</th><th>· key ' + k2 + '</th><th>difference</th><th>share</th></tr>';
  const line = (name, x, y) => '<tr><td>' + name + '</td><td class="num">' + fmt(x) + '</td><td class="num">' + fmt(y) + '</td><td class="num diff">' + fmt(x - y) + '</td><td class="num">' + (d ? pct((x - y) / d) : '') + '</td></tr>';
  rows.forEach((p, i) => { s += line(esc(label(p)), a[6][i], b[6][i]); });
  s += line('all other query parts', a[6][rows.length], b[6][rows.length]);
  return s + '</table>';
}
function detail() {
  const out = $('.detail');
  if (!sel) { out.innerHTML = '<p class="note">Click a cell of the pattern (query row, key column).</p>'; return; }
  if (second) out.innerHTML = '<h2>contrast of two keys</h2>' + contrast(sel[0], sel[1], second[1]) + '<div class="side"><div>' + one(sel[0], sel[1]) + '</div><div>' + one(second[0], second[1]) + '</div></div>';
  else out.innerHTML = one(sel[0], sel[1]);
  out.querySelectorAll('.mcell').forEach((td) => { td.addEventListener('mousemove', (ev) => showTip(ev, 'term ' + fmt(+td.dataset.term) + (td.dataset.share !== 'null' ? ', ' + pct(+td.dataset.share) + ' of the score' : ''))); td.addEventListener('mouseleave', () => { tip.style.display = 'none'; }); });
}
$('.heads').innerHTML = D.heads.map((h, i) => '<button data-i="' + i + '">L' + D.layer + 'H' + h + '</button>').join('');
root.querySelectorAll('.heads button').forEach((b) => b.addEventListener('click', () => { head = +b.dataset.i; draw(); detail(); }));
$('.bases').innerHTML = 'basis: ' + D.bases.map((b) => '<button data-basis="' + b + '">' + b + '</button>').join('');
root.querySelectorAll('.bases button').forEach((b) => b.addEventListener('click', () => { basis = b.dataset.basis; draw(); detail(); }));
if (D.profile) { let s = '<h2>QK profile</h2><table class="profile"><tr>' + D.profile.columns.map((c) => '<th>' + esc(c) + '</th>').join('') + '</tr>';
  for (const r of D.profile.rows) s += '<tr>' + r.map((v) => typeof v === 'number' ? '<td class="num">' + fmt(v) + '</td>' : '<td>' + esc(v) + '</td>').join('') + '</tr>';
  $('.profile-box').innerHTML = s + '</table>'; }
draw(); detail();
root.dataset.ready = '1';
})();
"""


def _payload_json(payload: dict[str, Any]) -> str:
    # inside <script>: "</" would end the element; JSON allows "<\/"
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


@register("qk_explorer")
def explorer_html(payload: dict[str, Any], fragment: bool = False) -> str:
    """The page (``fragment``: the element alone, for a notebook cell)."""
    root_id = f"qkx-{uuid.uuid4().hex[:12]}"
    title = html.escape(str(payload.get("title", "QK explorer")))
    n = len(payload["tokens"])
    body = (
        f'<div class="qkx" id="{root_id}"><style>{CSS}</style>'
        f"<h1>{title}</h1>"
        f'<p class="note">{n} tokens; pairs with attention ≥ {payload["min_prob"]} have their top '
        f"{payload['top_k']} terms. Click a cell; shift-click a second key of the same query to "
        "compare.</p>"
        '<div class="bar heads"></div><div class="bar bases"></div>'
        '<div class="main"><canvas></canvas><div class="detail"></div></div>'
        '<div class="profile-box"></div><div class="tip"></div>'
        f"{json_script(payload)}"
        f"<script>{SCRIPT.replace('ROOT_ID', json.dumps(root_id))}</script></div>"
    )
    return page(body, title, fragment)
