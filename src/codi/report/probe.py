"""Probe results: the Table-3 matching rule, summary metrics, PNG plots (matplotlib, Agg) and one
self-contained HTML page (the rule itself is described in `codi.analysis.probe`'s docstring).

The HTML has no external assets (inline CSS, images as base64 data URIs) so it can be mailed or
archived as one file. Each question is one `<tr class="question-row">`; its latent tokens are coloured
green when they match a reference intermediate result (rule "first_token", see `codi.analysis.probe`).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence

from ..analysis.probe_metric import ProbeRecord, TopK, step_positions, token_matches, write_jsonl

SAMPLE_QUESTIONS = 20  # rows of the top-1 heatmap


def _figure(width: float, height: float):
    # The object-oriented API renders with Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _label(text: str, limit: int = 8) -> str:
    """Token text safe for matplotlib's default font: visible spaces, "?" for exotic characters."""
    text = "".join(
        "\u2423" if ch == " " else ch if ch.isprintable() and (ord(ch) < 0x300) else "?" for ch in text
    )
    return text if len(text) <= limit else text[: limit - 1] + "~"


def plot_top1_heatmap(records: Sequence[ProbeRecord], path: str) -> str:
    """Top-1 probability per position (columns) for the first questions (rows), tokens annotated."""
    rows = [r for r in records if r.positions][:SAMPLE_QUESTIONS]
    width = max((len(r.positions) for r in rows), default=1)
    grid = [
        [r.positions[p].top.probs[0] if p < len(r.positions) else 0.0 for p in range(width)] for r in rows
    ]
    fig = _figure(max(5.0, 1.3 + 0.9 * width), 1.2 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot()
    image = ax.imshow(grid or [[0.0]], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, record in enumerate(rows):
        for p, position in enumerate(record.positions):
            color = "black" if position.top.probs[0] > 0.6 else "white"
            ax.text(p, i, _label(position.top.tokens[0]), ha="center", va="center", fontsize=7, color=color,
                    parse_math=False)  # fmt: skip
    labels = rows[0].positions if rows else []
    ax.set_xticks(range(len(labels)), [position.label for position in labels], rotation=30, fontsize=8)
    ax.set_yticks(range(len(rows)), [f"q{r.index}" for r in rows], fontsize=8)
    ax.set_title("top-1 token and its probability per position", fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 probability")
    fig.savefig(path)
    return path


def plot_match_rates(summary: dict, path: str) -> str:
    """Table 3 as bars: share of problems whose top-k contain the intermediate results, by step count."""
    table = summary["table3"]["first_token"]
    names = [name for name in ("1", "2", "3+", "all") if table.get(name, {}).get("n")]
    fig = _figure(5.5, 3.2)
    ax = fig.add_subplot()
    for offset, key in ((-0.2, "in_order"), (0.2, "any_order")):
        values = [100 * table[name][key] for name in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=key.replace("_", " "))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), [f"{name} (n={table[name]['n']})" for name in names])
    ax.set_ylim(0, 125)
    ax.set_xlabel("reference CoT steps")
    ax.set_ylabel("% problems matched")
    ax.set_title("top-k tokens contain the intermediate results", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    fig.savefig(path)
    return path


def plot_latent_geometry(summary: dict, path: str) -> str:
    """Mean pairwise cosine similarity of the latent vectors and their mean norms."""
    cosine, norms = summary.get("latent_cosine_mean") or [[0.0]], summary.get("latent_norm_mean") or [0.0]
    fig = _figure(8.0, 3.2)
    left, right = fig.subplots(1, 2)
    image = left.imshow(cosine, vmin=-1.0, vmax=1.0, cmap="coolwarm")
    for i, line in enumerate(cosine):
        for j, value in enumerate(line):
            left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ticks = [str(i + 1) for i in range(len(cosine))]
    left.set_xticks(range(len(ticks)), ticks)
    left.set_yticks(range(len(ticks)), ticks)
    left.set_title("mean cosine similarity of latents", fontsize=9)
    fig.colorbar(image, ax=left)
    right.bar(range(1, len(norms) + 1), norms)
    right.set_xticks(range(1, len(norms) + 1))
    right.set_xlabel("latent")
    right.set_title("mean L2 norm of latents", fontsize=9)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f2f2f2}
.q{max-width:28em} .small{font-size:11px;color:#666}
.tok{display:inline-block;font-family:monospace;white-space:pre;padding:0 3px;margin:1px;border-radius:3px;background:#eee}
.tok.hit{background:#8fd694;font-weight:bold}
.pos{display:inline-block;border-left:2px solid #bbb;padding:0 4px;margin:2px 0;vertical-align:top}
.res{font-family:monospace;padding:0 3px;border-radius:3px;background:#f4d7d7}
.res.hit{background:#8fd694}
.ok{color:#1a7f37;font-weight:bold} .bad{color:#c62828;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:4px;vertical-align:top}
"""


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _tokens_html(topk, steps) -> str:
    parts = []
    for token, prob in zip(topk.tokens, topk.probs):
        hits = [str(i + 1) for i, step in enumerate(steps) if token_matches(token, step)]
        title = f"p={prob:.3f}" + (f"; result of step {', '.join(hits)}" if hits else "")
        css = "tok hit" if hits else "tok"
        parts.append(f'<span class="{css}" title="{html.escape(title)}">{html.escape(token)}</span>')
    return "".join(parts)


def _lens_html(record: ProbeRecord) -> str:
    """A layers x positions table of the logit lens's top-1 token (only when it was probed)."""
    if not record.positions or record.positions[0].lens is None:
        return ""
    head = "".join(f"<th>{html.escape(p.label)}</th>" for p in record.positions)
    rows = []
    for layer in range(len(record.positions[0].lens)):
        top1 = [TopK(p.lens[layer].tokens[:1], [], p.lens[layer].probs[:1]) for p in record.positions]
        cells = "".join(
            f'<td>{_tokens_html(t, record.steps)} <span class="small">{t.probs[0]:.2f}</span></td>'
            for t in top1
        )
        rows.append(f"<tr><th>layer {layer}</th>{cells}</tr>")
    return f"<details><summary>logit lens</summary><table><tr><th></th>{head}</tr>{''.join(rows)}</table></details>"


def _record_row(record: ProbeRecord) -> str:
    found = step_positions(record)
    steps = (
        " ".join(
            f'<span class="res{" hit" if hits else ""}" title="{html.escape(step.expression)}">'
            f"{html.escape(step.result)}</span>"
            for step, hits in zip(record.steps, found)
        )
        or '<span class="small">none</span>'
    )
    latent = "".join(
        f'<div class="pos"><div class="small">{html.escape(p.label)}</div>{_tokens_html(p.top, record.steps)}'
        + (
            f'<div class="small">after prj:</div>{_tokens_html(p.projected, record.steps)}'
            if p.projected
            else ""
        )
        + "</div>"
        for p in record.positions
    )
    verdict = {True: '<span class="ok">✓</span>', False: '<span class="bad">✗</span>', None: ""}[
        record.correct
    ]
    predicted = "–" if record.predicted is None else f"{record.predicted:g}"
    title = html.escape(record.predicted_text or "")
    return (
        f'<tr class="question-row"><td>{record.index}</td><td class="q">{html.escape(record.question)}</td>'
        f"<td>{steps}</td><td>{latent}{_lens_html(record)}</td>"
        f'<td title="{title}">{html.escape(predicted)} {verdict}</td><td>{html.escape(record.gold or "–")}</td></tr>'
    )


def _summary_html(summary: dict) -> str:
    rows = []
    for key, where in (("table3", "before projection"), ("table3_after_projection", "after projection")):
        for rule, table in summary.get(key, {}).items():
            cells = "".join(
                f"<td>{_pct(table[name]['in_order'])} / {_pct(table[name]['any_order'])}"
                f' <span class="small">n={table[name]["n"]}</span></td>'
                for name in ("1", "2", "3+", "all")
            )
            rows.append(f"<tr><th>{where} · rule {rule}</th>{cells}</tr>")
    return (
        f"<p>{summary['num_questions']} questions · {summary['num_latent']} latent thoughts · "
        f"top-{summary['top_k']} · answer accuracy {_pct(summary.get('accuracy'))}</p>"
        "<table><tr><th>match (in order / any order)</th><th>1 step</th><th>2 steps</th><th>3+ steps</th>"
        f"<th>all</th></tr>{''.join(rows)}</table>"
        f'<p class="small">{html.escape(summary.get("match_rule", ""))}</p>'
    )


def _image(path: str, alt: str) -> str:
    with open(path, "rb") as handle:
        data = base64.b64encode(handle.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(
    records: Sequence[ProbeRecord], summary: dict, images: dict[str, str], title: str = ""
) -> str:
    """The whole report page as one string (images given as PNG paths are inlined)."""
    title = title or "CODI latent-thought probe"
    pictures = "".join(_image(path, name) for name, path in images.items())
    body = "".join(_record_row(record) for record in records)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{_summary_html(summary)}"
        f"<h2>Plots</h2>{pictures}<h2>Questions</h2>"
        '<p class="small">Latent tokens: the LM head\'s top-k tokens after &lt;bot&gt; and after each latent '
        "thought (hover for probabilities); green = a reference intermediate result.</p>"
        '<table id="questions"><tr><th>#</th><th>question</th><th>reference results</th>'
        f"<th>latent tokens</th><th>predicted</th><th>gold</th></tr>{body}</table></body></html>"
    )


def write_report(records: Sequence[ProbeRecord], summary: dict, output_dir: str, title: str = "") -> dict:
    """Write probe_records.jsonl, probe_summary.json, three PNGs and report.html; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"records": write_jsonl(records, os.path.join(output_dir, "probe_records.jsonl"))}
    paths["summary"] = os.path.join(output_dir, "probe_summary.json")
    with open(paths["summary"], "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    images = {
        "top1_heatmap": plot_top1_heatmap(records, os.path.join(output_dir, "top1_heatmap.png")),
        "match_rate": plot_match_rates(summary, os.path.join(output_dir, "match_rate.png")),
        "latent_geometry": plot_latent_geometry(summary, os.path.join(output_dir, "latent_geometry.png")),
    }
    paths.update(images)
    paths["html"] = os.path.join(output_dir, "report.html")
    with open(paths["html"], "w", encoding="utf-8") as handle:
        handle.write(render_html(records, summary, images, title))
    return paths
