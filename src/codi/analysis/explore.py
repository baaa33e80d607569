"""`codi explore --model DIR`: a local web page to look at what a CODI model does with a question.

Side by side: the teacher's explicit chain of thought (`mode="cot"`), the latent answer, and the
answer after an intervention on one latent thought (zeroed, or Gaussian noise at sigma x its RMS);
below, each latent position's top-k tokens before and after the projection (`codi.analysis.probe`) and the
logit lens (every layer's state through the final norm and the LM head) as a heatmap.

Built with Gradio (the optional extra `explore`). The page is served on this machine only by default (`--host` changes that), with no share
link, analytics off and system fonts, so it starts offline and no asset is fetched from the network.
"""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.eval_data import normalize_question
from .probe import PositionProbe, TopK, _Decoder, _probe_batch, find_final_norm

INTERVENTIONS = ("none", "zero", "noise")
EXAMPLES = [
    "Tom has 12 apples and buys 30 more. How many apples does he have now?",
    "A shop sells 7 pens for 3 dollars each. How many dollars does the shop get for all of the pens?",
    "Janet has 16 eggs. She eats 3 and bakes with 4. She sells the rest for 2 dollars each. "
    "How many dollars does she make?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts does it take in total?",
]


# --------------------------------------------------------------------------------------------------
# What the page shows, computed without Gradio


@dataclass
class Exploration:
    """Everything shown for one question.

    positions: probes at `<bot>` and after each latent (top-k before/after the projection, logit lens).
    intervened_positions: the same probes with the intervention applied (None when there is none).
    """

    question: str
    cot_text: str
    latent_text: str
    positions: list[PositionProbe]
    intervention: str = "none"
    intervened_text: str | None = None
    intervened_positions: list[PositionProbe] | None = None


def single_latent_transform(kind: str, index: int, sigma: float = 1.0, seed: int = 0):
    """`(step, latent (B, d)) -> (B, d)` changing latent `index` only (1-based: latent 1 is the one made
    from `<bot>`, fed at step 0): "zero" replaces it with zeros, "noise" adds N(0, (sigma * RMS)^2)
    noise, where RMS is the latent's own root mean square (seeded: the same noise on every run)."""
    if kind not in INTERVENTIONS[1:]:
        raise ValueError(f"intervention must be one of {INTERVENTIONS[1:]}, got {kind!r}")

    def transform(step: int, latent: torch.Tensor) -> torch.Tensor:
        if step != index - 1:
            return latent
        if kind == "zero":
            return torch.zeros_like(latent)
        rms = latent.float().pow(2).mean(-1, keepdim=True).sqrt()
        generator = torch.Generator(device=latent.device).manual_seed(seed)
        noise = torch.randn(latent.shape, generator=generator, device=latent.device)
        return (latent.float() + sigma * rms * noise).to(latent.dtype)

    return transform


class _Intervened:
    """`model` whose `encode_latents` applies `transform`: lets `codi.analysis.probe` decode intervened latents."""

    def __init__(self, model, transform):
        self._model, self._transform = model, transform

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_latents(self, *args, **kwargs):
        return self._model.encode_latents(*args, latent_transform=self._transform, **kwargs)


def explore_question(
    model,
    question: str,
    *,
    top_k: int = 5,
    num_latent: int | None = None,
    intervention: str = "none",
    latent_index: int = 1,
    sigma: float = 1.0,
    max_new_tokens: int = 256,
) -> Exploration:
    """Answer `question` in both modes, probe every latent position, and apply one intervention."""
    question = normalize_question(question)
    if not question:
        raise ValueError("the question is empty")
    num_latent = model.args.latents(num_latent)
    if intervention != "none" and not 1 <= int(latent_index) <= num_latent:
        raise ValueError(f"latent {latent_index} does not exist: choose 1..{num_latent}")
    decoder = _Decoder(model, int(top_k))
    norm = find_final_norm(model.hf_model)
    options = dict(num_latent=num_latent, max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        cot = model.generate([question], mode="cot", max_new_tokens=max_new_tokens)[0].text
        latent = model.generate([question], mode="latent", **options)[0].text
        positions = _probe_batch(model, decoder, [question], num_latent, True, True, norm)[0][0]
        result = Exploration(question, cot, latent, positions, intervention)
        if intervention != "none":
            transform = single_latent_transform(intervention, int(latent_index), sigma)
            result.intervened_text = model.generate([question], latent_transform=transform, **options)[0].text
            intervened = _Intervened(model, transform)
            result.intervened_positions = _probe_batch(
                intervened, decoder, [question], num_latent, True, True, norm
            )[0][0]
    finally:
        model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------------
# HTML (inline styles only: nothing is loaded from elsewhere)


def token_text(token: str) -> str:
    """A token made visible: spaces as "␣", newlines as "⏎", HTML-escaped."""
    return html.escape(token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")) or "∅"


def _topk_spans(topk: TopK | None) -> str:
    """The top-k tokens as shaded chips (probability -> colour)."""
    if topk is None:
        return '<span style="color:#888">(not computed)</span>'
    return "".join(
        f'<span class="tok" style="{_shade(p)}padding:1px 4px;margin:1px;border-radius:3px;display:inline-block">'
        f"{token_text(t)} <small>{p:.2f}</small></span>"
        for t, p in zip(topk.tokens, topk.probs)
    )


def _shade(prob: float) -> str:
    """Background from white (p = 0) to blue (p = 1), on a square-root scale so that p = 0.1 shows;
    white text on dark cells."""
    level = min(max(float(prob), 0.0), 1.0) ** 0.5
    red, green, blue = (int(255 - (255 - c) * level) for c in (37, 99, 235))
    return f"background:rgb({red},{green},{blue});color:{'#fff' if level > 0.6 else '#111'};"


def latents_html(result: Exploration) -> str:
    """One row per position (after `<bot>`, after each latent): the top-k of the last-layer state there
    (before the projection), then of the latent made from it (projected, fed next), then the same two
    with the intervention. Row `<bot>` makes latent 1, row "latent i" makes latent i + 1."""
    head = (
        "<tr><th>after</th><th>state: top-k before projection</th><th>makes</th><th>its top-k (fed next)</th>"
    )
    intervened = result.intervened_positions
    if intervened:
        head += f"<th>with the intervention ({html.escape(result.intervention)}): state / latent made</th>"
    rows = []
    for index, position in enumerate(result.positions):
        made = f"latent {index + 1}" if position.projected is not None else "(answer)"
        row = f"<tr><td><b>{html.escape(position.label)}</b></td><td>{_topk_spans(position.top)}</td>"
        row += f"<td>{made}</td><td>{_topk_spans(position.projected)}</td>"
        if intervened:
            other = intervened[index]
            row += f"<td>{_topk_spans(other.top)}<br>{_topk_spans(other.projected)}</td>"
        rows.append(row + "</tr>")
    table = f'<table id="latents-table" style="border-collapse:collapse">{head}{"".join(rows)}</table>'
    return f"<h3>Latent thoughts decoded (top-{len(result.positions[0].top.tokens)})</h3>{table}"


def lens_html(positions: Sequence[PositionProbe]) -> str:
    """Logit-lens heatmap: rows are layers (0 = embeddings), columns positions; top-1 token and its prob."""
    if not positions or not positions[0].lens:
        return "<p>No logit lens.</p>"
    head = "<tr><th>layer</th>" + "".join(f"<th>{html.escape(p.label)}</th>" for p in positions) + "</tr>"
    rows = []
    for layer in range(len(positions[0].lens)):
        cells = []
        for position in positions:
            top = position.lens[layer]
            prob = top.probs[0]
            title = html.escape(
                ", ".join(f"{t!r} {p:.2f}" for t, p in zip(top.tokens, top.probs)), quote=True
            )
            cells.append(
                f'<td title="{title}" style="{_shade(prob)}padding:3px 6px;text-align:center">'
                f"{token_text(top.tokens[0])}<br><small>{prob:.2f}</small></td>"
            )
        name = "embeddings" if layer == 0 else f"block {layer}"
        rows.append(f"<tr><td><b>{name}</b></td>{''.join(cells)}</tr>")
    table = f'<table id="lens-table" style="border-collapse:collapse">{head}{"".join(rows)}</table>'
    return f"<h3>Logit lens (top-1 token per layer; hover for the top-k)</h3>{table}"


# --------------------------------------------------------------------------------------------------
# The page


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and launch
    try:
        import gradio
    except ImportError as error:
        raise ImportError("codi explore needs gradio: pip install 'codi-latent[explore]'") from error
    return gradio


def theme():
    """Gradio's base theme with system fonts (its default fonts would be fetched or served separately)."""
    gr = _gradio()
    return gr.themes.Base(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def build_app(
    model,
    examples: Sequence[str] | None = None,
    *,
    top_k: int = 5,
    max_new_tokens: int = 256,
    source: str | None = None,
):
    """The explorer page for a loaded `CODIModel` (a `gr.Blocks`; serve it with `serve`).

    `source`: the checkpoint's name shown in the header (default: the base model's)."""
    gr = _gradio()
    examples = list(examples or EXAMPLES)
    default_latents = model.args.latents()

    def run(question, k, num_latent, intervention, latent_index, sigma):
        try:
            result = explore_question(
                model,
                question,
                top_k=int(k),
                num_latent=int(num_latent),
                intervention=intervention,
                latent_index=int(latent_index),
                sigma=float(sigma),
                max_new_tokens=max_new_tokens,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        intervened = result.intervened_text if result.intervened_text is not None else "(no intervention)"
        return (
            result.cot_text,
            result.latent_text,
            intervened,
            latents_html(result),
            lens_html(result.positions),
        )

    with gr.Blocks(title="CODI explorer", analytics_enabled=False) as app:
        gr.Markdown(
            f"## CODI explorer\n`{html.escape(str(source or model.args.model_name_or_path))}` · "
            f"{default_latents} latent thoughts at inference · decoding: greedy"
        )
        with gr.Row():
            question = gr.Textbox(label="Question", value=examples[0], lines=3, elem_id="question", scale=3)
            with gr.Column(scale=1):
                k = gr.Slider(1, 10, value=top_k, step=1, label="top-k tokens per latent")
                num_latent = gr.Slider(
                    0, max(12, 2 * default_latents), value=default_latents, step=1, label="latents"
                )
        gr.Examples(examples=[[text] for text in examples], inputs=[question], label="Examples")
        with gr.Row():
            intervention = gr.Radio(
                list(INTERVENTIONS), value="zero", label="Intervention", elem_id="intervention"
            )
            latent_index = gr.Slider(1, max(1, default_latents), value=1, step=1, label="on latent")
            sigma = gr.Slider(0.0, 5.0, value=1.0, step=0.1, label="noise sigma (x the latent's RMS)")
        button = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Row():
            cot = gr.Textbox(label="Teacher: explicit chain of thought", lines=4, elem_id="cot-answer")
            latent = gr.Textbox(label="CODI: latent answer", lines=4, elem_id="latent-answer")
            intervened = gr.Textbox(
                label="Latent answer with the intervention", lines=4, elem_id="intervened-answer"
            )
        latents = gr.HTML(elem_id="latents")
        lens = gr.HTML(elem_id="lens")
        inputs = [question, k, num_latent, intervention, latent_index, sigma]
        outputs = [cot, latent, intervened, latents, lens]
        button.click(run, inputs, outputs, concurrency_limit=1)
        question.submit(run, inputs, outputs, concurrency_limit=1)
    return app


def serve(app, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `app` on host:port, offline: no share link, no analytics, system fonts, no server rendering.

    Returns `app`; with `block=False` it is served from a background thread until `app.close()`.
    """
    _gradio()
    # gradio's run statistics call pandas options that pandas 3 deprecates, once per click: not ours to
    # fix, and noise in the console of the person exploring.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="gradio.queueing")
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        theme=theme(),
        ssr_mode=False,
        footer_links=[],
        show_error=True,
        quiet=not block,
    )
    return app


def load_examples(path: str, limit: int = 20) -> list[str]:
    """Questions to pick from: a GSM8k-style .jsonl / .json, an ICoT .txt (`question||cot #### answer`
    lines), or any other text file with one question a line."""
    if path.endswith((".jsonl", ".json")):
        from ..data.dataset import read_records

        questions = [record.question for record in read_records(path)]
    else:
        with open(path, encoding="utf-8") as handle:
            questions = [line.split("||", 1)[0].strip() for line in handle if line.strip()]
    if not questions:
        raise ValueError(f"{path}: no questions found")
    return questions[:limit]


def launch(
    model_dir: str,
    port: int = 7860,
    *,
    host: str = "127.0.0.1",
    examples_file: str | None = None,
    base_model: str | None = None,
    device: str | None = None,
    top_k: int = 5,
    max_new_tokens: int = 256,
    block: bool = True,
):
    """Load the checkpoint in `model_dir` and serve the explorer on http://host:port."""
    from ..distributed import local_device
    from ..io.loader import load

    _gradio()  # a missing `explore` extra fails before the model loads
    examples = load_examples(examples_file) if examples_file else None
    model = load(model_dir, base_model)
    model.to(device or str(local_device()))
    app = build_app(model, examples, top_k=top_k, max_new_tokens=max_new_tokens, source=model_dir)
    return serve(app, host=host, port=port, block=block)
