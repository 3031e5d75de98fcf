"""Drive notebooks in a real JupyterLab with headless Chromium (Debian's, through Playwright).

    with chromium_page() as page, jupyter_lab(root) as url:   # page first: skips before Lab starts
        open_notebook(page, url, "demo.ipynb")
        assert run_all(page) == []              # error outputs, if any
        wait_for_widget_text(page, ["compute = 0.50"])
        move_slider(page, "capacity", "ArrowLeft", times=3)

Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
Without Chromium or Playwright, chromium_page() skips the test with the reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# Silences the "check for updates / fetch news" toast that would otherwise cover the page.
QUIET_NOTIFICATIONS = {"checkForUpdates": False, "fetchNews": "false"}
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in front
# Lab renders a cell's exception as a stderr output; IPython's traceback names the cell.
STDERR = ".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"
TRACEBACK_RE = r"Cell In\[\d+\], line \d+|Traceback \(most recent call last\)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "api/status", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _shutdown_kernels(url: str) -> None:
    """Kernels run in their own sessions, so stopping the server by PID alone could orphan them."""
    try:
        with urllib.request.urlopen(url + "api/kernels", timeout=5) as r:
            kernels = json.load(r)
        for k in kernels:
            req = urllib.request.Request(f"{url}api/kernels/{k['id']}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()
    except (urllib.error.URLError, OSError, ValueError):
        pass


@contextlib.contextmanager
def jupyter_lab(root_dir: str | Path, start_timeout: float = 120.0):
    """Start JupyterLab on a free port serving root_dir; yield its base URL (ends with '/').

    Settings, workspaces, config and runtime files live in a temporary folder, so the run neither
    reads nor changes the user's or the venv's JupyterLab state. The server is stopped by its PID.
    """
    root_dir = Path(root_dir).resolve()
    if not root_dir.is_dir():
        raise FileNotFoundError(f"jupyter_lab: root_dir {root_dir} is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix="elastilab-lab-"))
    settings = tmp / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(QUIET_NOTIFICATIONS))
    # never autosave: a test run must not overwrite the committed, executed notebooks nbval compares
    docmanager = tmp / "user-settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(tmp / "server.log", "wb")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
           "--ServerApp.token=", "--ServerApp.password=", "--allow-root",
           f"--ServerApp.root_dir={root_dir}"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root_dir)
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                    f"did not answer within {start_timeout:.0f} s"
                tail = (tmp / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"JupyterLab {why}; server log:\n{tail}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            _shutdown_kernels(url)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900, timeout_ms: int = 60_000):
    """A Playwright page in headless Debian Chromium with a fresh profile; skips if unavailable."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set CHROMIUM=...)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install`)")
    with tempfile.TemporaryDirectory(prefix="elastilab-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height})
        try:
            context.set_default_timeout(timeout_ms)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def open_notebook(page, url: str, name: str, timeout: float = 120.0) -> None:
    """Open root_dir/name in Lab (workspace reset: no other tabs) and wait until its kernel is idle.

    The toolbar indicator reads 'idle' before any kernel exists, and a Run All clicked then is
    lost, so wait on the status bar showing this notebook and "<kernel name> | Idle".
    """
    page.goto(f"{url}lab/tree/{name}?reset", timeout=timeout * 1000)
    page.locator(f"{PANEL} .jp-Notebook").first.wait_for(timeout=timeout * 1000)
    page.wait_for_function(
        r"""name => {
            const items = [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                .map(e => e.textContent.trim());
            return items.includes(name) && items.some(t => /^(?!No Kernel).+ \| Idle$/.test(t));
        }""", arg=Path(name).name, timeout=timeout * 1000)


def _state(page) -> str:
    """Kernel status and cell prompts, for error messages."""
    return page.evaluate(f"""() => JSON.stringify({{
        kernel: [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(e => e.textContent)
            .filter(t => t.includes(' | ')),
        prompts: [...document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputPrompt')]
            .map(e => e.textContent)}})""")


def run_all(page, timeout: float = 120.0) -> list[str]:
    """Run → Run All Cells; wait until the run started and finished; return the error outputs.

    Finished = kernel idle, no cell queued ([*]), and every non-empty code cell has a count or
    some cell raised (Lab stops a Run All at the first error). A MutationObserver records that
    the run started, so stale counts from a saved notebook cannot end the wait early.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.evaluate(f"""() => {{
        const panel = document.querySelector('{PANEL}');
        window.__runStarted = false;
        new MutationObserver((_, obs) => {{
            const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
            const busy = ind?.dataset.status !== 'idle';
            const queued = [...panel.querySelectorAll('.jp-InputPrompt')]
                .some(e => e.textContent.includes('*'));
            if (busy || queued) {{ window.__runStarted = true; obs.disconnect(); }}
        }}).observe(panel, {{subtree: true, childList: true, characterData: true, attributes: true}});
    }}""")
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    try:
        page.wait_for_function(rf"""() => {{
            const panel = document.querySelector('{PANEL}');
            const cells = [...panel.querySelectorAll('.jp-CodeCell')];
            const prompt = c => c.querySelector('.jp-InputPrompt')?.textContent ?? '';
            const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
            const idle = ind?.dataset.status === 'idle';
            const code = cells.filter(c => c.querySelector('.cm-content')?.textContent.trim());
            const ran = code.every(c => /\[\d+\]/.test(prompt(c)));
            const failed = [...panel.querySelectorAll("{STDERR}")]
                .some(e => /{TRACEBACK_RE}/.test(e.textContent));
            const queued = cells.some(c => prompt(c).includes('*'));
            return (window.__runStarted || code.length === 0) && idle && !queued && (ran || failed);
        }}""", timeout=timeout * 1000)
    except PlaywrightTimeout as e:  # say where the notebook got stuck
        raise TimeoutError(f"Run All did not finish within {timeout:.0f} s: {_state(page)}") from e
    return error_outputs(page)


def error_outputs(page) -> list[str]:
    """Tracebacks shown in the front notebook (stderr outputs that name a cell or say Traceback)."""
    texts = page.locator(f"{PANEL} {STDERR}").all_inner_texts()
    return [t for t in texts if re.search(TRACEBACK_RE, t)]


def slider(page, label: str):
    """The ipywidgets slider whose description is exactly `label`."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    label_el = page.locator(".widget-label", has_text=exact)
    return page.locator(f"{PANEL} .widget-slider").filter(has=label_el)


def move_slider(page, label: str, key: str = "ArrowLeft", times: int = 1) -> str:
    """Focus the slider's handle, press `key` `times` times; return the slider's readout text."""
    box = slider(page, label)
    if box.count() != 1:
        raise LookupError(f"expected one slider labelled {label!r}, found {box.count()}")
    handle = box.locator(".noUi-handle").first
    handle.focus()
    for _ in range(times):
        handle.press(key)
    return box.locator(".widget-readout").first.inner_text()


def widget_text(page) -> list[str]:
    """Texts printed into widget outputs (ipywidgets Output / interactive_output), stripped."""
    texts = page.locator(f"{PANEL} .jupyter-widgets .jp-RenderedText").all_inner_texts()
    return [t.strip() for t in texts]


def wait_for_widget_text(page, until=None, timeout: float = 30.0) -> list[str]:
    """Poll widget_text until it equals `until` (a list), satisfies it (a callable), or, with
    until=None, is non-empty. Widget outputs re-render asynchronously after every change."""
    ok = (lambda t: bool(t)) if until is None else until if callable(until) else (lambda t: t == until)
    deadline, now = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        now = widget_text(page)
        if ok(now):
            return now
        page.wait_for_timeout(100)
    raise TimeoutError(f"widget text is {now!r}, still not {until!r} after {timeout:.0f} s")


def screenshot(page, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path
