"""What the ``elastilab`` subcommands share: argument types, the help format, defaults read from the
library's signatures, and the loader of the text commands. Every module that adds subcommands imports
these from here (never from ``cli``, which imports those modules: no cycle)."""
from __future__ import annotations

import argparse
import inspect
import json
import shlex
from pathlib import Path


def default_of(fn, name: str):
    """The default of parameter ``name`` of ``fn`` (a function or a dataclass), so that a command's
    default is the library's own, written once."""
    default = inspect.signature(fn).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)} has no default for {name!r}")
    return default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default that is not None/False (and that the help does not state in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default:" in (action.help or ""):  # 0 is shown
            return action.help
        return super()._get_help_string(action)


def capacity(text: str) -> float:
    """argparse type: one capacity in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"capacity must be in (0, 1], got {value}")
    return value


def capacities(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated capacities in (0, 1], e.g. ``0.75,0.5``."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated capacities like 0.75,0.5, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"capacities must be in (0, 1], got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated, non-empty list of names."""
    out = tuple(v.strip() for v in text.split(",") if v.strip())
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names, got an empty one")
    return out


def int_at_least(low: int):
    """An argparse type: an integer >= low, e.g. ``type=int_at_least(1)`` for a positive count."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # what argparse names in its own messages
    return parse


positive_int = int_at_least(1)


# ---------------------------------------------------------------- the text commands (train, eval, generation)
def load_lm(name: str):
    """(causal LM, tokenizer) by name, refusing models the text commands cannot run."""
    from elastilab import zoo
    model, tok = zoo.load(name)
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(f"this command takes causal language models (e.g. smollm2-135m), but {name!r} "
                         f"is a {type(model).__name__}; image models such as dinov2-small are trained and "
                         "evaluated with `elastilab vit`, tiny-llava with `elastilab vlm`")
    return model, tok


def recommended_capacities(path: Path) -> dict | None:
    """The operating point stored as "recommended_capacities" in <path>/routers.json, if any."""
    from elastilab.core.checkpoint import META_FILE
    meta = json.loads((Path(path) / META_FILE).read_text())
    rec = meta.get("recommended_capacities") if isinstance(meta, dict) else None
    if rec is not None and not (isinstance(rec, dict) and rec):
        raise ValueError(f"{Path(path) / META_FILE}: recommended_capacities must be a non-empty "
                         f"{{component: capacity}} object, got {rec!r}")
    return rec


def command_line(args_or_argv) -> str:
    """The command that reproduces a run, shell-quoted (a JSON --point stays one argument when pasted); results
    record it. Takes the parsed args (``cli.main`` sets ``args.argv``) or an argv list."""
    argv = getattr(args_or_argv, "argv", args_or_argv)
    return "elastilab " + shlex.join(argv)
