"""The README's "library in one screen" runs top to bottom exactly as printed, on the offline model."""
import re
from pathlib import Path

import pytest

import elastilab as el

ROOT = Path(__file__).resolve().parent.parent


def one_screen() -> str:
    """The python block under "## The library in one screen", padded so that a traceback's line numbers
    are the README's."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^## The library in one screen\n\n```python\n(.*?)^```$", readme, re.S | re.M)
    assert found, "README.md lacks the python block of '## The library in one screen'"
    return "\n" * readme[:found.start(1)].count("\n") + found.group(1)


@pytest.mark.slow
def test_the_readme_library_in_one_screen_runs_as_printed(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    monkeypatch.chdir(tmp_path)  # it saves runs/r1
    names = {}
    exec(compile(one_screen(), str(ROOT / "README.md"), "exec"), names)
    plt.close("all")
    em = names["em"]  # the routers it saved, loaded back into the plain model
    assert isinstance(em, el.ElasticModel) and em.capacities == {"attn_tokens": 0.75, "mlp_experts": 0.25}
    assert em.elastic_config.mode == "running" and em.elastic_config.keep_dense == {"attn_tokens": (-2, -1, 0, 1)}
    assert {"learned", "random", "oracle"} <= set(names["df"].scorer)
    assert len(names["log"]) == 2 and (tmp_path / "runs" / "r1" / "routers.safetensors").is_file()
