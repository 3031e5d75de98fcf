"""The quality frontier: one tidy table per modality, its summary, the plot, the CLI and the README report."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import report as commands
from elastilab.core.config import LAYER_COMPONENTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm_frontier():
    torch.manual_seed(0)
    model = CASES["llama"]().model
    em = el.elastify(model, el.ElasticConfig(**{c: 1.0 for c in LAYER_COMPONENTS}, n_experts=4))
    blocks = torch.randint(0, 101, (4, 16))
    df = el.frontier(em, blocks, capacities=(0.75, 0.5), scorers=("learned", "random", "oracle", "magnitude"),
                     progress=False)
    return em, df


def test_lm_frontier_rows_and_measured_compute(lm_frontier):
    em, df = lm_frontier
    assert set(df.columns) >= {"scorer", "component", "capacity", "compute", "model_compute", "scoring_cost",
                               "quality", "ppl_ratio", "kl", "agreement"}
    dense = df[df.capacity == 1.0]
    assert (dense.ppl_ratio == 1.0).all() and (dense.agreement == 1.0).all()
    routed = df[df.capacity < 1.0]
    assert (routed.sublayer_compute < 1.0).all() and (routed.ppl_ratio != 1.0).any()
    # every method runs the same sub-layer compute at one capacity (mlp slices / tokens: exactly)
    for (comp, cap), g in (routed[routed.component.isin(["mlp_tokens", "mlp_experts"])]
                           .groupby(["component", "capacity"])):
        assert g.sublayer_compute.nunique() == 1, (comp, cap)
    mlp = routed[(routed.component == "mlp_experts") & (routed.capacity == 0.5)].set_index("scorer")
    assert mlp.loc["learned", "sublayer_compute"] == pytest.approx(0.5)
    # the cost of choosing counts: magnitude pays for its gate projection (a third of a SwiGLU MLP),
    # a router for its Linear; the oracle's scoring is not compute
    assert mlp.loc["magnitude", "compute"] == pytest.approx(0.5 + 1 / 3, rel=1e-3)
    assert mlp.loc["magnitude", "scoring_cost"] > mlp.loc["learned", "scoring_cost"] > 0
    assert 0.5 < mlp.loc["learned", "compute"] < 0.52  # Linear(64, 4) next to a 64 x 96 SwiGLU
    assert mlp.loc["oracle", "scoring_cost"] == 0 and mlp.loc["oracle", "compute"] == 0.5
    assert mlp.loc["oracle", "model_compute"] < 1
    assert ("magnitude", "mlp_tokens") in df.attrs["skipped"]
    assert em.capacities == {c: 1.0 for c in LAYER_COMPONENTS} and em.scorer is None  # left as it was


def test_summary_efficiency_and_plot(lm_frontier):
    _, df = lm_frontier
    s = el.frontier_summary(df)
    assert len(s) == 4 * 2 and set(s.best_oracle.dropna()) <= {"oracle"}
    gap = np.log(s.random) - np.log(s.oracle)
    assert (gap > 0).any()  # on this tiny model too, the oracle beats random somewhere
    expected = (np.log(s.random) - np.log(s.learned)) / gap
    assert np.allclose(s.router_efficiency[gap > 0], expected[gap > 0])
    assert s.router_efficiency[gap <= 0].isna().all()  # no ceiling, no efficiency
    fig = el.plot_frontier(df)
    assert len(fig.axes) == 4 and fig.axes[0].get_yscale() == "log"
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"learned", "random", "oracle", "magnitude"}


def test_vit_frontier_on_a_tiny_model():
    case = CASES["hf_dinov2"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=1.0, attn_tokens=1.0, n_experts=4))
    task = el.ViTTask(torch.randn(6, 3, 32, 32))
    df = el.frontier(em, task, capacities=(0.5,), scorers=("random", "cls_attention", "oracle"), progress=False)
    assert df.attrs["metric"] == "cosine"  # no probe or head: cosine of the final hidden states
    assert len(df) == 2 * 3 * 2 and (df[df.capacity == 1.0].cosine > 0.9999).all()
    assert (df[df.capacity == 0.5].compute < 1).all()


def test_frontier_refuses_bad_requests(lm_frontier):
    em, _ = lm_frontier
    blocks = torch.randint(0, 101, (2, 8))
    with pytest.raises(ValueError, match=r"\['visual_tokens'\] not elastic in this model"):
        el.frontier(em, blocks, components=["visual_tokens"], progress=False)
    with pytest.raises(ValueError, match="unknown scorer 'best'"):
        el.frontier(em, blocks, scorers=["best"], progress=False)
    with pytest.raises(ValueError, match="capacities must be in"):
        el.frontier(em, blocks, capacities=[1.5], progress=False)
    with pytest.raises(TypeError, match="token blocks"):
        el.frontier(em, "some text", progress=False)


def test_report_tables_match_docs_results():
    """docs/RESULTS.md's tables are exactly what `elastilab report` prints from the committed CSVs."""
    text = commands.report(ROOT / "benchmarks" / "results")
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    block = re.search(r"<!-- report:start -->\n(.*?)<!-- report:end -->", results, re.S)
    assert block, "docs/RESULTS.md lacks the <!-- report:start --> ... <!-- report:end --> block"
    assert block.group(1) == text, "docs/RESULTS.md tables are stale: run `elastilab report --update docs/RESULTS.md`"


def test_report_update_rewrites_only_the_block(tmp_path):
    from elastilab.cli.main import main
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# mine\n\nprose\n<!-- report:start -->\nold\n<!-- report:end -->\nmore prose\n")
    assert main(["report", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# mine\n\nprose\n<!-- report:start -->\n")
    assert text.endswith("<!-- report:end -->\nmore prose\n")
    assert commands.report(ROOT / "benchmarks" / "results") in text and "\nold\n" not in text
    doc.write_text("no marks here\n")
    assert main(["report", "--update", str(doc)]) == 2 and doc.read_text() == "no marks here\n"


def test_report_without_results_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no frontier results"):
        commands.report(tmp_path)


@pytest.mark.slow
def test_cli_frontier_on_a_user_text_and_image_folder(tmp_path, capsys):
    """A user's own text (through a model folder: the tiny Llama, so the CLI path is what is tested, in seconds)
    and a user's own image folder through the offline DINOv2-S."""
    from elastilab.cli.main import main
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    torch.manual_seed(0)
    CASES["llama"]().model.save_pretrained(tmp_path / "llama")
    _save_char_tokenizer(tmp_path / "llama", text.read_text())
    lm = ["frontier", "--model", str(tmp_path / "llama"), "--text", str(text), "--components", "mlp_experts",
          "--capacities", "0.5", "--blocks", "2", "--seq-len", "32", "--split", "all", "--json"]
    assert main(lm + ["--scorers", "random,magnitude"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["scorer"] for r in out["rows"]} == {"random", "magnitude"} and out["metric"] == "ppl_ratio"
    assert not list(tmp_path.glob("*.csv"))  # nothing written without --out
    # (a test may calibrate on what it reports)
    assert main(lm + ["--scorers", "random", "--allocate", str(text), "--calibration-blocks", "1"]) == 0
    rows = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    assert set(rows.allocation) == {"uniform", "budget"}
    routed = rows[rows.capacity == 0.5].set_index("allocation")
    assert routed.loc["budget", "compute"] == pytest.approx(0.5, abs=0.02)  # the budget is the measured compute
    assert routed.loc["uniform", "compute"] == pytest.approx(0.5, abs=0.02)
    from PIL import Image
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(
            images / f"{i}.png")
    assert main(["frontier", "--model", "dinov2-small", "--images", str(images), "--components", "mlp_tokens",
                 "--capacities", "0.5", "--scorers", "random,oracle",
                 "--out", str(tmp_path / "f")]) == 0
    df = pd.read_csv(tmp_path / "f" / "frontier.csv")
    assert set(df.scorer) == {"random", "oracle"} and (tmp_path / "f" / "frontier.png").stat().st_size > 1000
    assert main(["frontier", "--scorers", "learned", "--blocks", "1"]) == 2  # learned needs routers
    assert "needs --routers" in capsys.readouterr().err


def _save_char_tokenizer(folder, text):
    """A character tokenizer of ``text`` (< 101 ids, every case's vocabulary), saved as a Hugging Face one."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture
def fox(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return text


@pytest.mark.parametrize("name", ["qwen3", "smollm3", "gemma2", "gemma3", "phi3", "olmo2"])
def test_cli_frontier_on_a_model_folder_of_each_new_family(name, fox, tmp_path, capsys):
    from elastilab.cli.main import main
    torch.manual_seed(0)
    CASES[name]().model.save_pretrained(tmp_path / name)
    _save_char_tokenizer(tmp_path / name, fox.read_text())
    assert main(["frontier", "--model", str(tmp_path / name), "--text", str(fox), "--capacities", "0.5",
                 "--scorers", "random,oracle", "--blocks", "2", "--seq-len", "24", "--split", "all", "--json"]) == 0
    rows = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    supported = set(LAYER_COMPONENTS) - ({"attn_heads"} if name == "olmo2" else set())  # (its q norm spans heads)
    assert set(rows.component) == supported and set(rows.scorer) == {"random", "oracle"}
    assert (rows[rows.capacity == 1.0].ppl_ratio == 1.0).all()  # the folder's model, routed at 1.0, is itself
    routed = rows[rows.capacity == 0.5]
    assert (routed.sublayer_compute < 1).all() and (routed.ppl_ratio != 1.0).any()


def test_cli_frontier_names_the_supported_architectures(fox, tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from elastilab.cli.main import main
    cfg = GPTNeoXConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    _save_char_tokenizer(tmp_path / "neox", fox.read_text())
    assert main(["frontier", "--model", str(tmp_path / "neox"), "--text", str(fox), "--blocks", "1",
                 "--seq-len", "16", "--split", "all", "--scorers", "random"]) == 2
    err = capsys.readouterr().err
    assert "no adapter for GPTNeoXForCausalLM" in err
    for supported in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3Model"):
        assert supported in err


def test_cli_frontier_on_a_siglip_folder(tmp_path, capsys):
    """A vision tower without a CLS token, from a folder (224 px: the image pipeline resizes to a multiple of 14)."""
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from elastilab.cli.main import main
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=32)
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        pixels = (np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
    assert main(["frontier", "--model", str(tmp_path / "siglip"), "--images", str(tmp_path / "imgs"), "--size", "224",
                 "--capacities", "0.5", "--scorers", "random,oracle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = pd.DataFrame(out["rows"])
    assert out["metric"] == "cosine" and set(rows.component) == set(LAYER_COMPONENTS)
    assert (rows[rows.capacity == 1.0].cosine > 0.9999).all() and (rows[rows.capacity == 0.5].compute < 1).all()


def test_vision_calibration_holds_the_images_asked_for():
    """--calibration-images: the calibration task of a vision frontier takes that many train images (not the
    held-out test images it reports on)."""
    from elastilab.cli.frontier import build
    from elastilab.cli.main import parser
    argv = ["frontier", "--model", "dinov2-small", "--domain", "digits", "--n-images", "2", "--components",
            "mlp_tokens", "--scorers", "random", "--allocate-model", "digits", "--calibration-images", "5"]
    args = parser().parse_args(argv)
    _, task, _, calibration = build(args)
    assert len(task.pixels) == 2 and len(calibration.pixels) == 5
    assert not any(torch.equal(a, b) for a in calibration.pixels for b in task.pixels)
