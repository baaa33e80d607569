"""`codi explore`: the page in a real headless browser (Playwright driving the system Chromium), offline.

Loads the page of a tiny saved checkpoint, submits a question, reads the answers and the decoded
latents from the DOM, checks a screenshot is not blank, and that no request leaves this machine
(neither from the browser nor from the server process).
"""

from __future__ import annotations

import shutil
import socket
from urllib.parse import urlparse

import pytest
import torch

from codi.analysis.explore import (
    EXAMPLES,
    explore_question,
    latents_html,
    lens_html,
    load_examples,
    single_latent_transform,
    token_text,
)

QUESTION = "A shop sells 7 pens for 3 dollars each. How many dollars does the shop get?"
MAX_NEW_TOKENS = 24
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------------------------------------
# Without a browser


def test_single_latent_transform_changes_only_its_latent():
    latents = [torch.randn(2, 8) for _ in range(3)]
    zero = single_latent_transform("zero", 2)
    assert torch.equal(zero(0, latents[0]), latents[0]) and torch.equal(zero(2, latents[2]), latents[2])
    assert torch.equal(zero(1, latents[1]), torch.zeros(2, 8))
    noise = single_latent_transform("noise", 1, sigma=0.5, seed=3)
    first, again = noise(0, latents[0]), noise(0, latents[0])
    assert torch.equal(first, again) and not torch.equal(first, latents[0])  # seeded, and it changes
    rms = latents[0].pow(2).mean(-1, keepdim=True).sqrt()
    assert ((first - latents[0]) / rms).std().item() == pytest.approx(0.5, rel=0.5)
    with pytest.raises(ValueError, match="intervention must be one of"):
        single_latent_transform("shuffle", 1)


def test_exploration_matches_generate_and_the_intervention_reaches_the_model(make_model):
    model = make_model()
    result = explore_question(
        model, f"  {QUESTION}  ", intervention="zero", latent_index=1, max_new_tokens=12
    )
    assert result.question == QUESTION
    assert result.latent_text == model.generate([QUESTION], max_new_tokens=12)[0].text
    assert result.cot_text == model.generate([QUESTION], mode="cot", max_new_tokens=12)[0].text
    seen = []
    transform = single_latent_transform("zero", 1)
    expected = model.generate(
        [QUESTION], max_new_tokens=12, latent_transform=lambda s, x: seen.append(s) or transform(s, x)
    )
    assert result.intervened_text == expected[0].text and seen == list(range(model.args.num_latent))
    num_positions = model.args.num_latent + 1
    assert [p.label for p in result.positions][:2] == ["<bot>", "latent 1"]
    assert len(result.positions) == len(result.intervened_positions) == num_positions
    # the zeroed latent is what the intervened probe decodes at position 0 (the latent fed next)
    assert result.intervened_positions[0].latent_norm == 0.0 and result.positions[0].latent_norm > 0
    assert len(result.positions[0].lens) == model.hf_model.config.n_layer + 1
    page = latents_html(result) + lens_html(result.positions)
    assert token_text(result.positions[0].top.tokens[0]) in page and "block 2" in page


def test_examples_from_files(tmp_path):
    plain = tmp_path / "questions.txt"
    plain.write_text("What is 2 plus 3?\n\nicot question||<<1+1=2>> #### 2\n")
    assert load_examples(str(plain)) == ["What is 2 plus 3?", "icot question"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: no questions"):
        load_examples(str(empty))
    assert len(EXAMPLES) >= 3


# --------------------------------------------------------------------------------------------------
# In the browser


def _chromium() -> str:
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[explore]')")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("system Chromium not found (apt-get install chromium; .ci/run installs it)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record_outbound(monkeypatch) -> list:
    """Record every socket connection of this process to a non-loopback address (the server side)."""
    outbound = []
    for name in ("connect", "connect_ex"):
        original = getattr(socket.socket, name)

        def wrapper(self, address, _original=original):
            host = address[0] if isinstance(address, tuple) else str(address)
            if self.family in (socket.AF_INET, socket.AF_INET6) and host not in LOCAL_HOSTS:
                outbound.append(address)
            return _original(self, address)

        monkeypatch.setattr(socket.socket, name, wrapper)
    return outbound


def _distinct_colours(path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.mark.slow  # ~15 s: gradio's import, Chromium's start and the page's scripts
def test_page_in_a_headless_browser(make_model, tmp_path, monkeypatch):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    from codi.analysis.explore import launch
    from codi.model import CODIModel

    make_model().save_pretrained(str(tmp_path / "model"))
    reference = CODIModel.from_pretrained(str(tmp_path / "model"))
    expected = explore_question(reference, QUESTION, intervention="zero", max_new_tokens=MAX_NEW_TOKENS)
    outbound = _record_outbound(monkeypatch)
    port = _free_port()
    app = launch(str(tmp_path / "model"), port, max_new_tokens=MAX_NEW_TOKENS, device="cpu", block=False)
    requests = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#run").click()
            page.locator("#latents-table").wait_for(timeout=20_000)
            page.locator("#lens-table").wait_for(timeout=20_000)
            answers = {
                name: page.locator(f"#{name} textarea").input_value()
                for name in ("cot-answer", "latent-answer", "intervened-answer")
            }
            latents_text = page.locator("#latents").inner_text()
            lens_text = page.locator("#lens").inner_text()
            page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    assert answers == {
        "cot-answer": expected.cot_text,
        "latent-answer": expected.latent_text,
        "intervened-answer": expected.intervened_text,
    }
    assert "<bot>" in latents_text and "latent 1" in latents_text
    top1 = expected.positions[1].top.tokens[0].replace(" ", "␣").replace("\n", "⏎")
    assert top1 in latents_text
    assert "embeddings" in lens_text and "block 2" in lens_text
    assert _distinct_colours(tmp_path / "explore.png") > 100  # a rendered page, not a blank one
    foreign = [url for url in requests if urlparse(url).scheme in ("http", "https", "ws", "wss")]
    foreign = [url for url in foreign if urlparse(url).hostname not in LOCAL_HOSTS]
    assert foreign == [], f"the page fetched from the network: {foreign}"
    assert outbound == [], f"the server connected out: {outbound}"
