"""The real-browser tests: JupyterLab + headless Chromium run a notebook, move a capacity slider, and
the displayed compute fraction and quality must change."""
import re
from pathlib import Path

import pytest

from browser import (chromium_page, jupyter_lab, move_slider, open_notebook, run_all, screenshot,
                     wait_for_widget_text)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
LINE = re.compile(r"perplexity ([\d.]+) .*\| agreement ([\d.]+) \| compute ([\d.]+) of dense")


def _numbers(texts):
    for t in reversed(texts):
        m = LINE.search(t)
        if m:
            return tuple(float(x) for x in m.groups())
    return None


@pytest.mark.browser
def test_language_notebook_sliders_change_compute_and_quality():
    with chromium_page() as page, jupyter_lab(ROOT / "notebooks") as url:
        committed = (ROOT / "notebooks/01_language.ipynb").read_bytes()
        open_notebook(page, url, "01_language.ipynb")
        assert run_all(page, timeout=900) == []
        before = _numbers(wait_for_widget_text(page, lambda t: _numbers(t) is not None, timeout=120))
        assert before[2] == pytest.approx(1.0, abs=0.01)  # all capacities start at 1.0: dense
        move_slider(page, "mlp_tokens", "Home")  # 1.0 -> 0.25 in one step (one recomputation)
        texts = wait_for_widget_text(page, lambda t: (n := _numbers(t)) is not None and n[2] < 0.9, timeout=300)
        assert not any("Traceback" in t for t in texts), texts  # the redraw below the numbers worked too
        after = _numbers(texts)
        assert after[2] < before[2] - 0.1       # less compute
        assert after[0] != before[0] and after[1] <= before[1]  # and a different quality
        assert screenshot(page, ARTIFACTS / "browser_01_language.png").stat().st_size > 10_000
        assert (ROOT / "notebooks/01_language.ipynb").read_bytes() == committed  # no autosave over it


VISION = re.compile(r"accuracy ([\d.]+) .*\| agreement ([\d.]+) \| cosine ([\d.]+) \| compute ([\d.]+) of dense")


def _vision_numbers(texts):
    for t in reversed(texts):
        if m := VISION.search(t):
            return tuple(float(x) for x in m.groups())
    return None


@pytest.mark.browser
def test_vision_notebook_sliders_change_compute_and_quality():
    with chromium_page() as page, jupyter_lab(ROOT / "notebooks") as url:
        committed = (ROOT / "notebooks/02_vision.ipynb").read_bytes()
        open_notebook(page, url, "02_vision.ipynb")
        assert run_all(page, timeout=900) == []
        before = _vision_numbers(wait_for_widget_text(page, lambda t: _vision_numbers(t) is not None, timeout=120))
        assert before[3] < 0.95  # the notebook opens with token capacities at 0.5
        assert move_slider(page, "mlp_tokens", "End") == "1.00"  # 0.5 -> 1.0: every patch's MLP runs
        texts = wait_for_widget_text(
            page, lambda t: (n := _vision_numbers(t)) is not None and n[3] > before[3] + 0.05, timeout=300)
        assert not any("Traceback" in t for t in texts), texts
        after = _vision_numbers(texts)
        assert after[2] > before[2]  # more compute, features closer to the teacher's
        assert page.locator(".widget-output img").count() >= 1  # the overlay was redrawn as an image
        assert screenshot(page, ARTIFACTS / "browser_02_vision.png").stat().st_size > 10_000
        assert (ROOT / "notebooks/02_vision.ipynb").read_bytes() == committed  # no autosave over it


VLM = re.compile(r"image tokens kept (\d+)/65 \| accuracy ([\d.]+) .*\| agreement ([\d.]+) \| LM compute ([\d.]+) of")


def _vlm_numbers(texts):
    for t in reversed(texts):
        if m := VLM.search(t):
            return tuple(float(x) for x in m.groups())
    return None


@pytest.mark.browser
def test_vision_language_notebook_slider_changes_image_tokens_and_compute():
    with chromium_page() as page, jupyter_lab(ROOT / "notebooks") as url:
        committed = (ROOT / "notebooks/03_vision_language.ipynb").read_bytes()
        open_notebook(page, url, "03_vision_language.ipynb")
        assert run_all(page, timeout=900) == []
        before = _vlm_numbers(wait_for_widget_text(page, lambda t: _vlm_numbers(t) is not None, timeout=120))
        assert move_slider(page, "visual_tokens", "End") == "1.00"  # every image token enters the LM
        texts = wait_for_widget_text(
            page, lambda t: (n := _vlm_numbers(t)) is not None and n[0] == 65, timeout=300)
        assert not any("Traceback" in t for t in texts), texts
        after = _vlm_numbers(texts)
        assert after[3] > before[3] and after[2] == 1.0  # more LM compute; at 1.0 the teacher itself
        assert page.locator(".widget-output img").count() >= 1  # the overlay was redrawn
        assert screenshot(page, ARTIFACTS / "browser_03_vision_language.png").stat().st_size > 10_000
        assert (ROOT / "notebooks/03_vision_language.ipynb").read_bytes() == committed  # no autosave over it
