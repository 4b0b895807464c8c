"""The demo page (`hf-specdec demo`): its pure helpers, the lab and synthetic model paths, the command's argument
handling, and the page itself driven in headless Chromium (Debian's `chromium` through Playwright)."""

import argparse
import shutil
import socket
import time

import pytest
import torch
from conftest import perturbed_copy, tiny_model

from hf_specdec import GuidedDrafter, ModelDrafter, demo
from hf_specdec.testing import SyntheticTokenizer, tiny_causal_lm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def demo_args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def run_compare(catalog, target, drafter, prompt="hello hello hello world", temperature=0.0, **options):
    """The last (final) update of one Generate click: (speculative pane, plain pane, summary)."""
    settings = dict(num_draft_tokens=4, temperature=temperature, max_new_tokens=24) | options
    *_, final = demo.compare(catalog, prompt, target, drafter, **settings)
    return final


@pytest.fixture(scope="module")
def quick_catalog():
    return demo.catalog_from_args(demo_args("--quick", "--agreement", "0.9"))


# ---------------------------------------------------------------------------------------------------- helpers


def test_transcript_records_draft_and_target_runs():
    transcript = demo.Transcript()
    transcript.put(torch.tensor([[5, 6, 7]]))  # the prompt: not generated text
    transcript.put(torch.tensor([10]))  # a prefill's token (drafters that read the prefill's states)
    transcript.put_speculative(torch.tensor([11, 12, 13, 14]), 3, 4)  # 3 accepted drafts + correction
    transcript.put_speculative(torch.tensor([15]), 0, 4)  # first draft token refused
    transcript.put_speculative(torch.tensor([16, 17, 18]), 2, 2)  # whole draft accepted + bonus
    assert transcript.tokens == [10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert transcript.spans == [(1, False), (4, True), (6, False), (8, True), (9, False)]  # runs are merged
    assert (transcript.drafted, transcript.accepted, transcript.rounds) == (10, 5, 3)
    assert transcript.acceptance_rate == pytest.approx(0.5)
    assert transcript.mean_accepted_length == pytest.approx((5 + 3) / 3)  # tokens per verification round
    assert transcript.tokens_per_second > 0


@pytest.mark.parametrize("guided", [False, True], ids=["first-round-reads-the-prompt", "prefill-token"])
def test_transcript_counts_the_engines_rounds(guided):
    """Streamed from the engine, the transcript counts every verification round once, whether the first round
    read the prompt or a prefill (drafters that read its states) chose the first token."""
    target = tiny_model("llama", num_layers=2, seed=3)
    draft = perturbed_copy(target, noise=0.1)
    drafter = (GuidedDrafter.from_drafter(draft, target_config=target.config, verifier_layers=[1, 2]).eval()
               if guided else ModelDrafter(draft, num_draft_tokens=3))
    transcript = demo.Transcript()
    out = target.generate(torch.tensor([[5, 17, 33, 41]]), max_new_tokens=12, do_sample=False, streamer=transcript,
                          assistant_model=drafter, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    assert transcript.rounds == int(out.spec_stats.rounds.sum()) > 0
    assert transcript.tokens == out.sequences[0, 4:].tolist()


def test_transcript_as_plain_streamer():
    transcript = demo.Transcript()
    transcript.put(torch.tensor([[5, 6]]))
    for token in (7, 8, 9):
        transcript.put(torch.tensor([token]))
    transcript.end()
    assert transcript.tokens == [7, 8, 9] and transcript.spans == [(3, False)]
    assert transcript.rounds == transcript.drafted == 0 and transcript.acceptance_rate == 0.0


def test_cancelled_transcript_stops_generate():
    transcript = demo.Transcript()
    transcript.put(torch.tensor([[5]]))
    transcript.cancelled = True
    with pytest.raises(demo.GenerationCancelled):
        transcript.put(torch.tensor([6]))


class SlowModel:
    """Puts one token every 30 ms, like a slow target, so that the page has time to re-render meanwhile."""

    def __init__(self, num_tokens=10, fail=False):
        self.num_tokens, self.fail, self.finished = num_tokens, fail, False

    def generate(self, streamer, **kwargs):
        streamer.put(torch.tensor([[1, 2]]))
        for token in range(self.num_tokens):
            time.sleep(0.03)
            streamer.put(torch.tensor([token]))
        if self.fail:
            raise RuntimeError("out of memory")
        self.finished = True
        streamer.end()
        return "output"


def test_stream_generate_renders_while_generating():
    transcript = demo.Transcript()
    seen = []
    run = demo.stream_generate(SlowModel(), transcript, {}, render=lambda: len(transcript.tokens))
    while True:
        try:
            seen.append(next(run))
        except StopIteration as stop:
            assert stop.value == "output"
            break
    assert seen and all(0 < count < 10 for count in seen)  # partial text, re-rendered during generation
    assert len(transcript.tokens) == 10


def test_stream_generate_raises_errors_and_stops_when_abandoned():
    with pytest.raises(RuntimeError, match="out of memory"):
        list(demo.stream_generate(SlowModel(fail=True), demo.Transcript(), {}, render=lambda: None))
    model = SlowModel(num_tokens=1000)
    run = demo.stream_generate(model, demo.Transcript(), {}, render=lambda: None)
    next(run)
    run.close()  # the browser left: generate() must stop, not run on in its thread
    assert not model.finished


def test_split_text_keeps_split_characters_whole():
    tokenizer = SyntheticTokenizer(512)
    tokens = tokenizer.encode("aé<b>")  # é is two bytes: the span boundary below falls inside it
    pieces = demo.split_text(tokenizer.decode, tokens, [2, 3, len(tokens)])
    assert "".join(pieces) == "aé<b>"
    assert pieces[0] == "a" and "é" in pieces[1]


def test_render_tokens_escapes_and_highlights():
    tokenizer = SyntheticTokenizer(512)
    tokens = tokenizer.encode("x<script>&y")
    rendered = demo.render_tokens(tokenizer.decode, tokens, [(1, False), (9, True), (len(tokens), False)])
    assert "<script>" not in rendered
    assert '<span class="hfsd-draft">&lt;script&gt;</span>&amp;y' in rendered


def test_render_pane_and_summary_numbers():
    speculative, plain = demo.Transcript(), demo.Transcript()
    for transcript in (speculative, plain):
        transcript.put(torch.tensor([[3]]))
    speculative.put(torch.tensor([70]))  # a prefill's token
    speculative.put_speculative(torch.tensor([71, 72]), 1, 3)
    plain.put(torch.tensor([70]))
    pane = demo.render_pane("Speculative", speculative, SyntheticTokenizer(512).decode, speculative=True)
    assert "tok/s" in pane and "α <b>0.33</b>" in pane and "τ <b>2.00</b>" in pane and "1 rounds" in pane
    summary = demo.render_summary(speculative, plain, greedy=True, done=True)
    assert 'data-done="1"' in summary and "greedy outputs differ" in summary
    plain.put(torch.tensor([71]))
    plain.put(torch.tensor([72]))
    assert "greedy outputs identical" in demo.render_summary(speculative, plain, greedy=True, done=True)


# ---------------------------------------------------------------------------------------------------- models


def test_compare_synthetic_pair_is_lossless(quick_catalog):
    target = quick_catalog.target_names()[0]
    assert quick_catalog.drafter_names(target) == ["draft model (1 layer)", demo.NGRAM_DRAFTER]
    for drafter in quick_catalog.drafter_names(target):
        speculative, plain, summary = run_compare(quick_catalog, target, drafter)
        assert "greedy outputs identical ✓" in summary and "speed-up" in summary
        assert "24 tokens" in speculative and "24 tokens" in plain
    assert 'class="hfsd-draft"' in speculative  # n-gram drafts of a repetitive prompt get accepted


def test_compare_sampling_and_plain_first(quick_catalog):
    target = quick_catalog.target_names()[0]
    speculative, plain, summary = run_compare(quick_catalog, target, "draft model (1 layer)", temperature=0.8,
                                              plain_first=True)
    assert "sampling" in summary and "24 tokens" in speculative and "24 tokens" in plain


def test_compare_refuses_empty_prompt(quick_catalog):
    with pytest.raises(ValueError, match="prompt"):
        run_compare(quick_catalog, quick_catalog.target_names()[0], demo.NGRAM_DRAFTER, prompt="  ")


def byte_tokenizer():
    """An HF fast tokenizer built offline: one token per byte after pad/bos/eos, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {symbol: 3 + index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    return tokenizer


def test_lab_directory(tmp_path):
    """A lab-style directory (what recipes/lab.py writes): target + tokenizer, a plain and a sorted drafter."""
    target = tiny_causal_lm(vocab_size=259, num_layers=3, seed=0, eos_token_id=None)
    target.save_pretrained(tmp_path / "target")
    byte_tokenizer().save_pretrained(tmp_path / "target")
    tiny_causal_lm(vocab_size=259, num_layers=1, seed=1).save_pretrained(tmp_path / "drafters" / "small")
    sorted_model = tiny_causal_lm(vocab_size=259, num_layers=2, seed=2)
    sorted_model.config.sorted_exits = [1, 2]
    sorted_model.save_pretrained(tmp_path / "drafters" / "soft")

    catalog = demo.catalog_from_args(demo_args("--lab", str(tmp_path)))
    assert catalog.target_names() == ["lab"]
    assert catalog.drafter_names("lab") == ["small (model)", "soft (sorted)", demo.NGRAM_DRAFTER]
    for drafter in catalog.drafter_names("lab"):
        *_, summary = run_compare(catalog, "lab", drafter, prompt="a <b> & c")
        assert "greedy outputs identical ✓" in summary, drafter
    model = catalog.target("lab").drafter_models[str(tmp_path / "drafters" / "small")]
    assert catalog.drafter("lab", "small (model)", 7).model is model  # weights loaded once
    assert catalog.drafter("lab", "small (model)", 7).num_draft_tokens == 7


# ---------------------------------------------------------------------------------------------------- command


def test_arguments_build_the_app():
    gradio = pytest.importorskip("gradio")
    app = demo.build_app_from_args(demo_args("--quick", "--agreement", "0.9", "0.6", "--num-draft-tokens", "8"))
    assert isinstance(app, gradio.Blocks)
    catalog = demo.catalog_from_args(demo_args("--quick", "--agreement", "0.9", "0.6"))
    assert catalog.target_names() == ["synthetic 0.9 (tiny)", "synthetic 0.6 (tiny)"]
    assert demo.catalog_from_args(demo_args()).target_names() == ["synthetic 0.9 (206M)", "synthetic 0.6 (206M)"]


@pytest.mark.parametrize("argv, message", [
    (["--draft", "some/draft"], "--draft needs --target"),
    (["--lab", "/nonexistent/lab"], "not a lab directory"),
    (["--quick", "--num-draft-tokens", "13"], "--num-draft-tokens"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    pytest.importorskip("gradio")
    assert demo.run_demo_command(demo_args(*argv)) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_page():
    """The --quick page served in-process, open in headless Chromium; both closed afterwards."""
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    app = demo.build_app_from_args(demo_args("--quick", "--agreement", "0.9"))
    url = demo.launch(app, port=free_port(), block=False)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.wait_for_selector("#generate")  # the page is built by Gradio's JavaScript after load
                yield page
            finally:
                browser.close()
    finally:
        app.close()


def highlight_pixels(image, box) -> int:
    """Pixels of the accepted-draft background inside `box` (a Playwright bounding box in page coordinates)."""
    region = image.crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
    return sum(count for count, colour in region.getcolors(maxcolors=1 << 24)
               if all(abs(channel - wanted) <= 2 for channel, wanted in zip(colour, demo.DRAFT_COLOUR)))


def test_page_streams_both_generations(served_page, tmp_path):
    page = served_page
    page.fill("#prompt textarea", "The quick brown fox. The quick brown fox. The quick")
    page.fill("#draft-length input[type=number]", "6")
    page.keyboard.press("Tab")  # the slider takes the typed number on blur
    page.fill("#max-new-tokens input[type=number]", "48")
    page.keyboard.press("Tab")
    page.click("#generate")
    page.wait_for_selector('#summary [data-done="1"]', timeout=60_000)

    speculative = page.inner_text("#speculative-pane .hfsd-tokens")
    plain = page.inner_text("#plain-pane .hfsd-tokens")
    assert speculative and speculative == plain  # greedy: lossless
    assert "greedy outputs identical" in page.inner_text("#summary")
    assert "speed-up" in page.inner_text("#summary")
    stats = page.inner_text("#speculative-pane .hfsd-stats")
    assert "tok/s" in stats and "α" in stats and "τ" in stats and "48 tokens" in stats
    assert "γ=6" in page.inner_text("#speculative-pane h3")
    assert "tok/s" in page.inner_text("#plain-pane .hfsd-stats")
    assert page.locator("#speculative-pane .hfsd-draft").count() > 0
    assert page.locator("#plain-pane .hfsd-draft").count() == 0

    screenshot = tmp_path / "demo.png"
    page.evaluate("window.scrollTo(0, 0)")  # bounding boxes are in viewport coordinates: make them page ones
    page.screenshot(path=str(screenshot), full_page=True)
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    speculative_box = page.locator("#speculative-pane .hfsd-pane").bounding_box()
    plain_box = page.locator("#plain-pane .hfsd-pane").bounding_box()
    assert speculative_box["x"] + speculative_box["width"] <= plain_box["x"]  # side by side
    assert abs(speculative_box["y"] - plain_box["y"]) < 5
    assert highlight_pixels(image, speculative_box) > 500  # accepted drafts are visibly highlighted
    assert highlight_pixels(image, plain_box) == 0
    heading = page.locator("h1").first
    assert heading.inner_text() == demo.TITLE and heading.bounding_box()["y"] < speculative_box["y"]
    assert "one after the other" in page.inner_text("body")
    assert page.title() == "hf_specdec demo"
