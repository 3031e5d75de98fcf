"""environment.yml (conda users) must list exactly the pip requirements of pyproject.toml; the one `elastilab`
command line: every subcommand has its help, and the documented command lines name real ones."""
import argparse
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {p for p in pip if not p.startswith("-e")}
    local = {w for w in wanted if w.startswith("elastilab-kernels")}  # this repository's kernels/, installed first
    assert pip.index("-e ./kernels") < pip.index("-e ."), "environment.yml must install ./kernels before ."
    wanted -= local
    assert listed == wanted, (f"only in pyproject: {sorted(wanted - listed)}; "
                              f"only in environment.yml: {sorted(listed - wanted)}")


SUBCOMMANDS = ["train", "eval", "bench", "frontier", "report", "generation", "vit", "vlm", "zoo"]


def _leaves(parser, path=()):
    """(path, parser) of every runnable subcommand of the argparse tree, e.g. (("vit", "train"), ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, path + (name,))


def test_elastilab_help_lists_every_subcommand():
    """`elastilab --help` (the console script, and `python -m elastilab.cli` as torchrun runs it)."""
    import subprocess
    import sys
    script = Path(sys.executable).with_name("elastilab")
    for argv in ([sys.executable, "-m", "elastilab.cli.main", "--help"], [str(script), "--help"]):
        if not Path(argv[0]).exists():
            continue
        top = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert top.returncode == 0 and top.stdout.startswith("usage: elastilab"), (argv, top.stderr[-2000:])
        assert "Warning" not in top.stderr, top.stderr[-2000:]  # e.g. runpy's double-import warning
        listed = re.search(r"\{([\w,-]+)\}", top.stdout).group(1).split(",")
        assert set(SUBCOMMANDS) <= set(listed), listed


def test_every_subcommand_prints_its_help(capsys):
    from elastilab.cli import main as cli
    leaves = list(_leaves(cli.parser()))
    assert {p[:2] for p, _ in leaves} >= {("vit", "train"), ("vit", "bench"), ("vit", "crossdomain"), ("vlm", "train"),
                                          ("vlm", "bench"), ("zoo", "dinov2-build"), ("zoo", "dinov2-probe"),
                                          ("zoo", "tiny-llava-train"), ("bench", "speed"), ("bench", "mlp"),
                                          ("bench", "profile")}
    for path, _ in leaves:
        with pytest.raises(SystemExit) as e:
            cli.main([*path, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith("usage: elastilab " + " ".join(path)), (path, out[:300])


def test_the_old_module_entry_points_are_gone():
    """One command line: the modules no longer carry their own argparse main()."""
    import importlib
    for name in ("analysis.vision", "analysis.vlm", "analysis.bench", "cli.frontier", "zoo.dinov2", "zoo.tiny_llava"):
        assert not hasattr(importlib.import_module(f"elastilab.{name}"), "main"), name


def _documented_commands():
    """`elastilab ...` command lines cited in the READMEs, data/ notes and notebook markdown."""
    texts = [p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("data/**/*.md"),
                                     *ROOT.glob("benchmarks/*.md")]]
    for nb in ROOT.glob("notebooks/0*.ipynb"):
        texts += ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown"]
    for text in texts:
        yield from (" ".join(m.split()) for m in re.findall(r"`(elastilab [^`|]+)`", text))
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            lines = block.replace("\\\n", " ").splitlines()
            yield from (" ".join(line.split("  #")[0].split()) for line in lines if line.startswith("elastilab "))


def test_documented_commands_name_real_subcommands_and_options():
    from elastilab.cli import main as cli
    commands = list(_documented_commands())
    assert (any(c.startswith("elastilab vit ") for c in commands)
            and any(c.startswith("elastilab bench ") for c in commands))
    for command in commands:
        parser, words = cli.parser(), command.split()[1:]
        while words:  # walk down the subcommands the words name
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if not subs or words[0].startswith("-") or words[0] == "...":
                break
            assert words[0] in subs[0].choices, f"{command!r}: no subcommand {words[0]!r}"
            parser, words = subs[0].choices[words[0]], words[1:]
        assert not [a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)], f"{command!r}: incomplete"
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in parser._option_string_actions, f"{command!r}: no option {word!r}"


def test_command_defaults_are_the_functions_defaults(tmp_path):
    """Defaults are read from the library's signatures (cli_args.default_of), not restated."""
    from elastilab.analysis import bench, vision, vlm
    from elastilab.cli import main as cli
    from elastilab.cli.args import default_of
    from elastilab.zoo import dinov2, tiny_llava_train
    parse = lambda *argv: cli.parser().parse_args([*argv, "--out", str(tmp_path)])  # noqa: E731
    assert parse("vit", "train", "--domain", "photos").images == default_of(vision.train, "n") == 256
    assert parse("vit", "crossdomain").images == default_of(vision.crossdomain, "n")
    assert parse("vlm", "train").capacity_range == default_of(vlm.train_visual_router, "capacity_range")
    assert parse("vlm", "bench").routers == default_of(vlm.bench, "routers")
    assert parse("zoo", "tiny-llava-train").steps == default_of(tiny_llava_train.train, "steps") == 120
    assert parse("zoo", "dinov2-probe").size == default_of(dinov2.train_probe, "size")
    assert parse("bench", "mlp").reps == default_of(bench.mlp_speed, "reps") == 5
    assert parse("bench", "speed").reps == default_of(bench.speed, "reps") == 3
    with pytest.raises(TypeError, match="no default for 'domain_name'"):
        default_of(vision.train, "domain_name")
