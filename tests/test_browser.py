"""The real-browser tests: JupyterLab + headless Chromium run a notebook top to bottom, move a
capacity slider, and the numbers the notebook prints (compute and quality) must change."""
import re
from pathlib import Path

import pytest
from browser import chromium_page, jupyter_lab, move_slider, open_notebook, run_all, screenshot, wait_for_widget_text

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def _last_match(pattern: re.Pattern, texts):
    """The numbers of the last widget output line that matches ``pattern``, or None."""
    for t in reversed(texts):
        if m := pattern.search(t):
            return tuple(float(x) for x in m.groups())
    return None


def run_and_move(notebook: str, pattern: str, slider: str, key: str, moved) -> tuple[tuple, tuple, object]:
    """Run all of ``notebook``, read the printed numbers, press ``key`` on ``slider``, wait until the
    numbers satisfy ``moved(before, numbers)``; return (before, after, page). Also checks that no traceback
    appeared, that a figure was drawn in the widget output, and that the committed notebook file was
    not touched (autosave is off in the harness)."""
    line = re.compile(pattern)
    numbers = lambda texts: _last_match(line, texts)
    path = ROOT / "notebooks" / notebook
    committed = path.read_bytes()
    with chromium_page() as page, jupyter_lab(ROOT / "notebooks") as url:
        open_notebook(page, url, notebook)
        assert run_all(page, timeout=900) == []
        before = numbers(wait_for_widget_text(page, lambda t: numbers(t) is not None, timeout=120))
        readout = move_slider(page, slider, key)
        texts = wait_for_widget_text(page, lambda t: (n := numbers(t)) is not None and moved(before, n), timeout=300)
        assert not any("Traceback" in t for t in texts), texts  # the redraw below the numbers worked too
        page.locator(".widget-output img").first.wait_for(timeout=120_000)  # the figure under the numbers
        assert screenshot(page, ARTIFACTS / f"browser_{path.stem}.png").stat().st_size > 10_000
    assert path.read_bytes() == committed
    return before, numbers(texts), readout


@pytest.mark.browser
def test_language_notebook_sliders_change_compute_and_quality():
    # perplexity, agreement, compute; the sliders start at a good trade-off (some compute saved, mlp_tokens
    # at 1.0); Home: mlp_tokens 1.0 -> 0.25 in one step
    before, after, _ = run_and_move(
        "01_language.ipynb", r"perplexity ([\d.]+) .*\| agreement ([\d.]+) \| compute ([\d.]+) of dense",
        "mlp_tokens", "Home", lambda b, n: n[2] < b[2] - 0.1)
    assert before[2] < 1.0 and before[1] > 0.5               # a saving that keeps most answers
    assert after[2] < before[2] - 0.1                        # less compute
    assert after[0] > before[0] and after[1] < before[1]     # and worse quality


@pytest.mark.browser
def test_vision_notebook_sliders_change_compute_and_quality():
    # accuracy, agreement, cosine, compute; the sliders start at a good trade-off with mlp_tokens at 1.0;
    # Home: mlp_tokens -> 0.125
    before, after, readout = run_and_move(
        "02_vision.ipynb",
        r"accuracy ([\d.]+) .*\| agreement ([\d.]+) \| cosine ([\d.]+) \| compute ([\d.]+) of dense",
        "mlp_tokens", "Home", lambda b, n: n[3] < b[3] - 0.05)
    assert readout in ("0.12", "0.13") and before[3] < 1.0  # 0.125, rounded by the widget
    assert after[2] < before[2]  # less compute, features further from the teacher's


@pytest.mark.browser
def test_vision_language_notebook_slider_changes_image_tokens_and_compute():
    # image tokens kept, accuracy, agreement, LM compute; visual_tokens starts at 0.5; End -> 1.0
    before, after, readout = run_and_move(
        "03_vision_language.ipynb",
        r"image tokens kept (\d+)/65 \| accuracy ([\d.]+) .*\| agreement ([\d.]+) \| LM compute ([\d.]+) of",
        "visual_tokens", "End", lambda b, n: n[0] == 65)
    assert readout == "1.00" and before[0] < 65
    assert after[3] > before[3] and after[2] == 1.0  # more LM compute; at 1.0 the teacher itself


@pytest.mark.browser
def test_your_model_notebook_capacity_slider_moves_the_measured_point():
    # oracle on mlp_units: perplexity ratio and sub-layer compute at the slider's capacity, 0.75 at the start;
    # Home: 0.25, a quarter of the units
    before, after, readout = run_and_move(
        "07_your_model.ipynb", r"at ([\d.]+): ppl ratio ([\d.]+) \| compute ([\d.]+) of the sub-layer",
        "capacity", "Home", lambda b, n: n[0] < b[0])
    assert readout == "0.25" and before[0] == 0.75 and after[0] == 0.25
    assert after[2] < before[2] and after[1] > before[1]  # less compute, further from the teacher
