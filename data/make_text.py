"""Rebuild the text domains in data/text/ deterministically.

    python data/make_text.py            # writes data/text/licenses.txt and pydocs.txt

licenses.txt: verbatim licence texts from Debian's /usr/share/common-licenses (base-files).
pydocs.txt:   docstrings of a fixed list of standard-library modules, read from the running
              interpreter (output depends on the Python version; the committed file used 3.11.7).
Sources and licences: data/PROVENANCE.md.
"""
import importlib
import inspect
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parent / "text"
LICENSE_DIR = Path("/usr/share/common-licenses")
# Distinct texts only (GPL, LGPL, GFDL are symlinks to the newest versions).
LICENSES = ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2",
            "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0"]
# Pure-Python modules with rich docstrings; fixed list so the output is stable.
MODULES = ["argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.tasks",
           "base64", "bisect", "calendar", "cmd", "collections", "configparser", "contextlib",
           "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
           "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "glob",
           "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib",
           "inspect", "ipaddress", "json", "logging", "logging.handlers", "mailbox", "netrc",
           "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pprint", "queue", "random",
           "re", "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
           "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
           "warnings", "weakref", "zipfile"]


def licenses() -> str:
    parts = [f"==== {name} ====\n\n{(LICENSE_DIR / name).read_text('utf-8').strip()}\n"
             for name in LICENSES]
    return "\n\n".join(parts)


def _doc(obj) -> str | None:
    doc = inspect.getdoc(obj) if getattr(obj, "__doc__", None) else None
    return doc.strip() if doc and doc.strip() else None


def _entries(modname: str):
    """(qualified name, docstring) for the module, its public classes/functions and methods."""
    mod = importlib.import_module(modname)
    yield modname, _doc(mod)
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            yield f"{modname}.{name}", _doc(obj)
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{modname}.{name}.{attr}", _doc(member)
        elif inspect.isfunction(obj):
            yield f"{modname}.{name}", _doc(obj)


def pydocs() -> str:
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io/typing.re warn on access
    seen, parts = set(), []
    for modname in MODULES:
        for qualname, doc in _entries(modname):
            if doc and doc not in seen:  # skip copied docstrings (aliases, overloads)
                seen.add(doc)
                parts.append(f"==== {qualname} ====\n\n{doc}\n")
    return "\n\n".join(parts)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in [("licenses", licenses), ("pydocs", pydocs)]:
        text = build()
        (OUT / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
        print(f"{name}.txt: {len(text.encode('utf-8')):,} bytes (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
