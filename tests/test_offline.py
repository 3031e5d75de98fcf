"""The offline defaults never reach for the network: the CLI runs with every socket connection refused
(and recorded) by a sitecustomize hook, and must succeed without a single attempt."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HOOK = '''
import socket, os
_log = os.environ["ELASTILAB_NET_LOG"]
def _refuse(self, address, *a, **k):
    with open(_log, "a") as f:
        f.write(repr(address) + "\\n")
    raise OSError("network cut by the elastilab offline test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
_getaddrinfo = socket.getaddrinfo
def _lookup(host, *a, **k):
    with open(_log, "a") as f:
        f.write("lookup " + repr(host) + "\\n")
    raise socket.gaierror("network cut by the elastilab offline test")
socket.getaddrinfo = _lookup
'''


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["-m", "elastilab.cli.main", "eval", "--domain", "licenses", "--blocks", "1", "--seq-len", "32",
     "--mlp-experts", "0.5", "--json"],
    ["-m", "elastilab.cli.main", "eval", "--routers", "data/routers/smollm2-135m", "--domain", "licenses",
     "--blocks", "1", "--seq-len", "32", "--json"],
    ["-m", "elastilab.cli.main", "frontier", "--model", "dinov2-small", "--domain", "digits", "--n-images", "4",
     "--components", "mlp_tokens", "--capacities", "0.5", "--scorers", "random", "--json"],
])
def test_cli_makes_no_network_connection(tmp_path, command):
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    log = tmp_path / "net.log"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ELASTILAB_NET_LOG": str(log), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not log.exists(), f"connection attempts: {log.read_text()}"


def test_the_hook_sees_connections(tmp_path):
    """The guard above would notice an attempt: a plain HTTP request is recorded and refused."""
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    log = tmp_path / "net.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "ELASTILAB_NET_LOG": str(log)}
    code = ("import urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:9/', timeout=1)\n"
            "except OSError:\n    pass")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert "127.0.0.1" in log.read_text()
