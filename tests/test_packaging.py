"""environment.yml (conda users) must list exactly the pip requirements of pyproject.toml."""
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {p for p in pip if not p.startswith("-e")}
    assert listed == wanted, f"only in pyproject: {sorted(wanted - listed)}; only in environment.yml: {sorted(listed - wanted)}"


MODULE_CLIS = ["elastilab.cli", "elastilab.vision", "elastilab.vlm", "elastilab.zoo.dinov2", "elastilab.zoo.tiny_llava"]


def test_every_documented_command_prints_its_help_cleanly():
    """`python -m <module> <sub> --help` for every command line the README and data/ READMEs cite."""
    import re
    import subprocess
    import sys
    for module in MODULE_CLIS:
        top = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert top.returncode == 0 and "usage" in top.stdout, (module, top.stderr[-2000:])
        assert "Warning" not in top.stderr, (module, top.stderr[-2000:])  # e.g. runpy's double-import warning
        subs = re.search(r"\{([\w,-]+)\}", top.stdout)
        for sub in subs.group(1).split(",") if subs else []:
            r = subprocess.run([sys.executable, "-m", module, sub, "--help"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "usage" in r.stdout, (module, sub, r.stderr[-2000:])
