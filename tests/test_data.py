import numpy as np
import pytest
import torch

from elastilab import data


def byte_tokenizer(s: str) -> list[int]:
    return list(s.encode("utf-8"))


class EncodeTokenizer:  # HF-like: .encode(text, add_special_tokens=...), no verbose kwarg
    def encode(self, s, add_special_tokens=True):
        return [ord(c) % 1000 for c in s] + ([0] if add_special_tokens else [])


def test_text_domains_exist_and_differ():
    domains = data.text_domains()
    assert {"licenses", "pydocs"} <= set(domains)
    texts = {name: data.text(name) for name in domains}
    for name, t in texts.items():
        assert 100_000 < len(t.encode("utf-8")) < 1_600_000, name
    assert "GNU GENERAL PUBLIC LICENSE" in texts["licenses"] and "Apache License" in texts["licenses"]
    assert "def " not in texts["licenses"][:5000]
    assert "ArgumentParser" in texts["pydocs"]
    # different domains: their word distributions overlap little at the top
    top = lambda t: {w for w, _ in __import__("collections").Counter(t.lower().split()).most_common(200)}
    assert len(top(texts["licenses"]) & top(texts["pydocs"])) < 120


def test_unknown_domain_lists_allowed_names():
    with pytest.raises(ValueError, match=r"unknown text domain 'wikitext'.*licenses.*pydocs"):
        data.text("wikitext")


def test_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        data.text_file(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8.*0xe9 at offset 3"):
        data.text_file(bad)
    good = tmp_path / "ok.txt"
    good.write_text("naïve ✓", encoding="utf-8")
    assert data.text_file(good) == "naïve ✓"


def test_token_blocks_shape_and_contiguity():
    s = data.text("licenses")
    blocks = data.token_blocks(byte_tokenizer, s, seq_len=64, n_blocks=5)
    assert blocks.shape == (5, 64) and blocks.dtype == torch.long
    assert bytes(blocks.flatten().tolist()) == s.encode("utf-8")[: 5 * 64]
    every = data.token_blocks(byte_tokenizer, s, seq_len=1000)
    assert every.shape[0] == len(s.encode("utf-8")) // 1000
    hf_like = data.token_blocks(EncodeTokenizer(), "abcdef" * 10, seq_len=6)
    assert hf_like.shape == (10, 6) and 0 not in hf_like  # no special tokens added


class BosTokenizer(EncodeTokenizer):  # Gemma-like: every encoded text starts with <bos> = 2
    bos_token_id = 2

    def encode(self, s, add_special_tokens=True, verbose=True):
        return ([2] if add_special_tokens else []) + [100 + ord(c) for c in s]


def test_token_blocks_start_with_the_bos_a_tokenizer_adds():
    blocks = data.token_blocks(BosTokenizer(), "abcdefghij", seq_len=4)
    assert blocks.tolist() == [[2, 197, 198, 199], [2, 200, 201, 202], [2, 203, 204, 205]]  # contiguous text
    assert data.leading_bos(BosTokenizer()) == 2 and data.leading_bos(EncodeTokenizer()) is None
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        data.token_blocks(BosTokenizer(), "abc", 1)


def test_split_is_by_position_and_disjoint():
    s = data.text("pydocs")
    train, ev = data.split_text(s, "train"), data.split_text(s, "eval", eval_fraction=0.1)
    assert train + ev == s and train.endswith("\n")
    assert 0.09 < len(ev) / len(s) < 0.11
    tr_blocks = data.token_blocks(byte_tokenizer, s, 256, split="train")
    ev_blocks = data.token_blocks(byte_tokenizer, s, 256, split="eval")
    assert bytes(ev_blocks[0].tolist()) == ev.encode("utf-8")[:256]
    assert bytes(tr_blocks[-1].tolist()) in train.encode("utf-8")
    # deterministic
    assert torch.equal(ev_blocks, data.token_blocks(byte_tokenizer, s, 256, split="eval"))


def test_token_blocks_bad_arguments():
    with pytest.raises(ValueError, match="split must be"):
        data.token_blocks(byte_tokenizer, "abc", 2, split="test")
    with pytest.raises(ValueError, match="eval_fraction"):
        data.token_blocks(byte_tokenizer, "abc", 2, split="eval", eval_fraction=1.5)
    with pytest.raises(ValueError, match=r"asked for 10 blocks of 4 tokens.*12 tokens \(3 blocks\)"):
        data.token_blocks(byte_tokenizer, "x" * 12, 4, n_blocks=10)
    with pytest.raises(ValueError, match="seq_len"):
        data.token_blocks(byte_tokenizer, "abc", 0)
    with pytest.raises(TypeError, match="tokenizer must"):
        data.token_blocks(42, "abc", 1)


def test_digits():
    images, labels = data.digits()
    assert images.shape == (5000, 20, 20) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    # white strokes on black; a "1" has less ink than a "0"
    assert images[:, 0, :].mean() < 5 and images.max() == 255
    assert images[labels == 1].mean() < 0.6 * images[labels == 0].mean()


def test_photos_and_faces():
    photos = data.photos()
    names = [p["name"] for p in photos]
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names)
    for p in photos:
        assert p["image"].ndim == 3 and p["image"].shape[2] == 3 and p["image"].dtype == np.uint8
        assert p["caption"] and "\n" not in p["caption"]
    assert photos[names.index("chelsea")]["caption"] == "Chelsea the cat."
    f = data.faces(7)
    assert f.shape == (7, 25, 25) and f.dtype == np.uint8 and f.max() > 100
    with pytest.raises(ValueError, match="between 1 and 100"):
        data.faces(101)


def test_missing_data_dir_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="data folder is missing"):
        data.text_domains()
