"""Offline data: text domains and digit images committed in data/, photos and faces from scikit-image.

Everything here works without network access. Sources and licences: data/PROVENANCE.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# data/ (and benchmarks/) sit at the repository root next to the package (the package is installed editable).
ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
# Bundled scikit-image photos tried in this order; ones that need network (pooch) are skipped.
PHOTO_NAMES = ["astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
               "immunohistochemistry", "moon", "page", "retina", "rocket", "text"]


def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        raise FileNotFoundError(
            f"elastilab's data folder is missing: expected {DATA_DIR}. It ships with the repository, "
            "so install elastilab from a checkout (pip install -e .) rather than from a wheel.")
    return DATA_DIR


# ---------------------------------------------------------------- text
def text_domains() -> list[str]:
    """Names of the committed text domains (data/text/<name>.txt), sorted."""
    return sorted(p.stem for p in (data_dir() / "text").glob("*.txt"))


def text(name: str) -> str:
    """The full text of one domain, e.g. text("licenses")."""
    domains = text_domains()
    if name not in domains:
        raise ValueError(f"unknown text domain {name!r}; allowed: {', '.join(domains)}")
    return text_file(data_dir() / "text" / f"{name}.txt")


def text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} (give a path to an existing UTF-8 file)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); convert it to UTF-8 first") from None


def _encode(tokenizer, s: str) -> list[int]:
    """Token ids without special tokens; accepts a Hugging Face tokenizer or any callable str -> ids."""
    if hasattr(tokenizer, "encode"):
        try:  # verbose=False silences HF's "sequence longer than model max" warning for long texts
            return list(tokenizer.encode(s, add_special_tokens=False, verbose=False))
        except TypeError:
            return list(tokenizer.encode(s))
    if callable(tokenizer):
        return list(tokenizer(s))
    raise TypeError(f"tokenizer must have .encode() or be callable, got {type(tokenizer).__name__}")


def leading_bos(tokenizer) -> int | None:
    """The id of the token a tokenizer puts before every text (Gemma's ``<bos>``: Gemma reads text badly
    without it), or None (SmolLM2 and GPT-2 add nothing; a plain callable has no special tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "encode"):
        return None
    ids = list(tokenizer.encode("a"))
    return bos if ids[:1] == [bos] else None


def split_text(s: str, split: str = "all", eval_fraction: float = 0.1) -> str:
    """Train/eval split by position: the last eval_fraction of the text (cut at a line start) is eval."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if split == "all":
        return s
    cut = int(len(s) * (1.0 - eval_fraction))
    newline = s.find("\n", cut)
    cut = newline + 1 if newline != -1 else cut  # snap to a line start so no line is shared
    return s[:cut] if split == "train" else s[cut:]


def token_blocks(tokenizer, s: str, seq_len: int, n_blocks: int | None = None, split: str = "all",
                 eval_fraction: float = 0.1) -> torch.Tensor:
    """Contiguous, non-overlapping blocks of token ids, LongTensor [n_blocks, seq_len].

    The text is split by position first (see split_text), so train and eval blocks never share text.
    n_blocks=None gives every complete block; the ragged tail is dropped. With a tokenizer that starts
    every text with a BOS token (``leading_bos``), each block is that token and seq_len - 1 text tokens.
    """
    bos = leading_bos(tokenizer)
    if seq_len < 1 + (bos is not None):
        raise ValueError(f"seq_len must be >= {1 + (bos is not None)}, got {seq_len}")
    ids = torch.tensor(_encode(tokenizer, split_text(s, split, eval_fraction)), dtype=torch.long)
    n_text = ids.numel()
    if bos is not None:
        n = n_text // (seq_len - 1)
        ids = torch.cat([torch.full((n, 1), bos), ids[: n * (seq_len - 1)].view(n, -1)], 1).flatten()
    available = ids.numel() // seq_len
    n = available if n_blocks is None else n_blocks
    if not 1 <= n <= available:
        part = {"all": "the text", "train": f"the train split (the first {1 - eval_fraction:.0%} of the text)",
                "eval": f"the eval split (the last {eval_fraction:.0%} of the text)"}[split]
        asked = "one block" if n_blocks is None else f"{n_blocks} blocks"
        raise ValueError(f"asked for {asked} of {seq_len} tokens but {part} has {n_text} tokens "
                         f"({available} blocks); use a longer text, a smaller seq_len"
                         f"{'' if n_blocks is None else ' or fewer blocks'}")
    return ids[: n * seq_len].view(n, seq_len)


# ---------------------------------------------------------------- images
def digits() -> tuple[np.ndarray, np.ndarray]:
    """5000 handwritten digits: images uint8 [5000, 20, 20] (white on black), labels int64 [5000].

    The sheet has 50 rows x 100 columns of 20x20 cells; rows 5c..5c+4 hold class c (500 per class).
    """
    from PIL import Image

    sheet = np.asarray(Image.open(data_dir() / "images" / "digits.png").convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"digits.png should be a 2000x1000 sheet, got {sheet.shape[::-1]}")
    images = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10, dtype=np.int64), 500)
    return np.ascontiguousarray(images), labels


def photos() -> list[dict]:
    """scikit-image's bundled photos as dicts {name, image (HxWx3 uint8), caption}.

    Gray photos are repeated over 3 channels; caption is the first line of the loader's docstring.
    """
    import skimage.data

    out = []
    for name in PHOTO_NAMES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            image = np.asarray(loader())
        except Exception:  # noqa: BLE001 - needs a download in this scikit-image version: skip it
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        caption = (loader.__doc__ or name).strip().splitlines()[0].strip()
        out.append({"name": name, "image": np.ascontiguousarray(image[..., :3], dtype=np.uint8),
                    "caption": caption})
    return out


def faces(n: int = 100) -> np.ndarray:
    """The first n of the 100 face crops in skimage.data.lfw_subset(): uint8 [n, 25, 25] gray."""
    import skimage.data

    if not 1 <= n <= 100:
        raise ValueError(f"faces(n): n must be between 1 and 100 (lfw_subset has 100 faces), got {n}")
    images = np.asarray(skimage.data.lfw_subset()[:n])  # float in [0, 1] in recent versions
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return images


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_images(folder: Path, limit: int) -> list:
    """uint8 arrays of the images in a folder (sorted by name, at most ``limit``)."""
    import numpy as np
    from PIL import Image
    if not folder.is_dir():
        raise ValueError(f"--images must be a folder of images, got {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]
