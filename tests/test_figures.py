"""The committed figures are what the current code draws from the committed CSVs, and every scorer keeps one
colour and marker everywhere."""
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from elastilab.analysis import figures
from elastilab.analysis.frontier import plot_frontier
from elastilab.analysis.palette import SCORER_STYLE, scorer_style
from elastilab.scorers import SCORERS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_scorer_has_its_own_colour_and_marker():
    assert set(SCORERS) | {"learned"} <= set(SCORER_STYLE)
    styles = list(SCORER_STYLE.values())
    assert len({s.color for s in styles}) == len(styles) and len({s.marker for s in styles}) == len(styles)


def _tiny_frontier(with_allocation: bool) -> pd.DataFrame:
    rows = [{"scorer": s, "component": "mlp_tokens", "capacity": c, "compute": c, "ppl_ratio": 1 / c}
            for s in ("learned", "random", "oracle", "magnitude") for c in (1.0, 0.75, 0.5)]
    df = pd.DataFrame(rows)
    if with_allocation:
        df["allocation"] = "uniform"
    df.attrs.update(metric="ppl_ratio", higher_is_better=False)
    return df


@pytest.mark.parametrize("with_allocation", [False, True])
def test_frontier_lines_take_the_scorers_colours(with_allocation):
    # a frontier without an allocation column once drew every scorer black
    fig = plot_frontier(_tiny_frontier(with_allocation))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for name in ("learned", "random", "oracle", "magnitude"):
        assert matplotlib.colors.same_color(lines[name].get_color(), scorer_style(name).color), name
        assert lines[name].get_marker() == scorer_style(name).marker
    plt.close(fig)


def test_a_long_title_is_wrapped_to_the_figure():
    fig = plot_frontier(_tiny_frontier(False), title="elastilab frontier " + "--flag value " * 20)
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert title.width <= fig.bbox.width and "\n" in fig._suptitle.get_text()
    plt.close(fig)


def test_difference_sees_a_recoloured_line_and_not_a_redraw():
    fig = figures.draw("frontier-smollm2-135m-units")
    a, b = figures.png(fig), figures.png(fig)
    assert figures.difference(a, b) == 0.0
    line = fig.axes[0].get_lines()[0]
    line.set_color("black" if line.get_color() != "black" else "gold")
    assert figures.difference(a, figures.png(fig)) > figures.TOLERANCE
    plt.close(fig)


def test_an_unknown_figure_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown figure 'frontier-nope'"):
        figures.draw("frontier-nope")


def test_the_committed_result_figures_are_current():
    assert figures.stale() == [], "run `elastilab figures --out benchmarks/results`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebooks_figures_are_current(notebook):
    shown = figures.notebook_images(notebook)
    if notebook.stem in ("01_language", "02_vision", "03_vision_language", "04_kernels", "05_evidence",
                         "06_two_models"):
        assert shown, f"{notebook.name} shows no committed figure through figures.show"
    assert figures.stale_in_notebook(notebook) == [], f"re-execute {notebook.name} (make notebooks)"
