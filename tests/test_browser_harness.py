"""The browser harness end to end: a slider notebook in real JupyterLab + headless Chromium."""
from pathlib import Path

import nbformat
import pytest
from browser import (
    chromium_page,
    jupyter_lab,
    move_slider,
    open_notebook,
    run_all,
    screenshot,
    wait_for_widget_text,
    widget_text,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SLIDER_CELL = """\
import ipywidgets as widgets
from IPython.display import display

capacity = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="capacity")
def show(capacity):
    print(f"compute = {capacity:.2f}")
display(widgets.VBox([capacity, widgets.interactive_output(show, {"capacity": capacity})]))"""


def write_notebook(path, *cells):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# harness check")] +
                                  [nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.browser
def test_slider_notebook_reacts_in_real_browser(tmp_path):
    write_notebook(tmp_path / "slider.ipynb", SLIDER_CELL)
    write_notebook(tmp_path / "broken.ipynb", "x = 1", "1 / 0", "print('not reached')")

    with chromium_page() as page, jupyter_lab(tmp_path) as url:
        open_notebook(page, url, "slider.ipynb")
        assert run_all(page, timeout=120) == []
        before = wait_for_widget_text(page, timeout=60)
        assert before == ["compute = 0.50"]

        readout = move_slider(page, "capacity", "ArrowLeft", times=3)
        assert readout.strip() == "0.35"
        after = wait_for_widget_text(page, lambda t: t != before and t[-1:] == ["compute = 0.35"])
        assert after == widget_text(page) == ["compute = 0.35"]
        shot = screenshot(page, ARTIFACTS / "browser_harness.png")
        assert shot.stat().st_size > 10_000

        open_notebook(page, url, "broken.ipynb")  # run_all reports the traceback, not a hang
        errors = run_all(page, timeout=60)
        assert len(errors) == 1 and "ZeroDivisionError" in errors[0]
