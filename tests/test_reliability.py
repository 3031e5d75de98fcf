"""Issue 9: never delete a user's files, never leave a model silently wrong, no code from the cache."""
import json
import os
import types
from pathlib import Path

import pytest
import torch
from model_cases import CASES
from safetensors.torch import load_file, save_file

import elastilab as el
import elastilab.core.checkpoint
import elastilab.files
from elastilab.core.block import ElasticBlock


def tiny_llama():
    case = CASES["llama"]()
    return case.model, case.inputs["input_ids"]


def saved_routers(tmp_path, **caps):
    model, ids = tiny_llama()
    em = el.elastify(model, **(caps or {"mlp_tokens": 0.5, "attn_heads": 0.5}))
    with torch.no_grad():
        for p in em.router_parameters():
            p.normal_()
    em.save_routers(tmp_path / "r")
    return em.unelastify(), ids, tmp_path / "r"


# ---------------------------------------------------------------- 1. the cache never deletes a user's folder
def test_empty_cache_variable_is_not_the_current_directory(monkeypatch):
    from elastilab.zoo import cache_dir, dinov2
    default = Path.home() / ".cache" / "elastilab"
    for value in ("", "  "):
        monkeypatch.setenv("ELASTILAB_CACHE", value)
        assert cache_dir("smollm2-135m") == default / "smollm2-135m"
        assert dinov2.cache_dir() == default / "dinov2-small"


@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-llava"])
def test_a_users_folder_in_the_cache_is_never_deleted(tmp_path, monkeypatch, name):
    monkeypatch.setenv("ELASTILAB_CACHE", str(tmp_path))
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{name} exists and holds files elastilab did not write"):
        el.zoo.load(name)
    assert (tmp_path / name / "notes.txt").read_text() == "precious"


# ---------------------------------------------------------------- 2, 3, 4, 7: load_routers checks first
def _corrupt(kind, path):
    w, j = path / "routers.safetensors", path / "routers.json"
    meta, state = json.loads(j.read_text()), load_file(str(w))
    if kind == "truncated":
        w.write_bytes(w.read_bytes()[:100])
    elif kind == "empty":
        w.write_bytes(b"")
    elif kind == "foreign":
        w.write_bytes(b"PK\x03\x04 not safetensors at all" * 10)
    elif kind == "shape [1]":
        save_file({k: torch.ones(1) for k in state}, str(w))
    elif kind == "nan":
        save_file({k: v.fill_(float("nan")) if k.endswith("proj.weight") else v for k, v in state.items()}, str(w))
    elif kind == "missing tensor":
        save_file(dict(list(state.items())[1:]), str(w))
    elif kind == "json list":
        j.write_text("[1, 2]")
    elif kind == "json garbage":
        j.write_text("{not json")
    elif kind == "no fingerprint":
        del meta["fingerprint"]
        j.write_text(json.dumps(meta))
    elif kind == "keep_dense 999":
        meta["elastic_config"]["keep_dense"] = {"mlp_tokens": [0, 999]}
        j.write_text(json.dumps(meta))
    elif kind == "dense_layers 1.5":
        meta["elastic_config"]["dense_layers"] = [1.5]
        j.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind, match", [
    ("truncated", "routers.safetensors is not a readable safetensors file"),
    ("empty", "routers.safetensors is not a readable safetensors file"),
    ("foreign", "routers.safetensors is not a readable safetensors file"),
    ("shape [1]", r"router tensor '[\w.]+' in .* has shape \[1\], but this model needs \[\d+"),
    ("nan", "holds NaN or infinite values"),
    ("missing tensor", "does not match the elastic layout of this model"),
    ("json list", "must hold a JSON object, got a list"),
    ("json garbage", "routers.json is not valid JSON"),
    ("no fingerprint", r"lacks \['fingerprint'\]"),
    ("keep_dense 999", r"keep_dense\['mlp_tokens'\] names layer 999, but the model has 3 layers"),
    ("dense_layers 1.5", "dense_layers must be a list of integer layer indices"),
])
def test_a_bad_checkpoint_is_refused_and_the_model_is_left_untouched(tmp_path, kind, match):
    model, ids, path = saved_routers(tmp_path)
    with torch.no_grad():
        before = model(ids).logits
    grads = [p.requires_grad for p in model.parameters()]
    _corrupt(kind, path)
    with pytest.raises(ValueError, match=match):
        el.load_routers(model, path)
    assert not any(isinstance(m, ElasticBlock) for m in model.model.layers)
    assert [p.requires_grad for p in model.parameters()] == grads
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_loading_or_elastifying_twice_says_already_elastic(tmp_path):
    model, _, path = saved_routers(tmp_path)
    em = el.load_routers(model, path)
    with pytest.raises(TypeError, match="already elastic"):
        el.load_routers(model, path)
    with pytest.raises(TypeError, match="already elastic"):
        el.elastify(model, mlp_tokens=0.5)
    with pytest.raises(TypeError, match="already elastic"):
        el.load_routers(em, path)


def test_a_failed_elastify_leaves_the_model_untouched():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="does not divide the MLP width"):
        el.elastify(model, el.ElasticConfig(mlp_experts=0.5, n_experts=5))
    assert not any(isinstance(m, ElasticBlock) for m in model.model.layers)
    assert all(p.requires_grad for p in model.parameters())


def test_layer_indices_out_of_range_or_not_integers_raise():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="dense_layers must be a list of integer layer indices"):
        el.ElasticConfig(mlp_tokens=0.5, dense_layers=(1.7,))
    with pytest.raises(ValueError, match="dense_layers names layer 3, but the model has 3 layers"):
        el.elastify(model, el.ElasticConfig(mlp_tokens=0.5, dense_layers=(3,)))
    em = el.elastify(model, mlp_tokens=0.5)
    with pytest.raises(ValueError, match=r"keep_dense\['mlp_tokens'\] names layer 100, but the model has 3 layers"):
        em.keep_dense(mlp_tokens=(100,))
    assert em.elastic_config.keep_dense == {}
    em.keep_dense(mlp_tokens=(-3, 2))  # negative indices count from the end
    assert [b.capacity["mlp_tokens"] for b in em.blocks] == [1.0, 0.5, 1.0]


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_ignores_dtype_and_sees_every_layer(tmp_path):
    model, ids, path = saved_routers(tmp_path)
    em = el.load_routers(model.to(torch.bfloat16), path)  # a bf16 copy is the same model
    with torch.no_grad():
        em(ids)
    em.unelastify()
    model = model.float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()  # one layer of the middle zeroed
    with pytest.raises(ValueError, match="trained for a different model"):
        el.load_routers(model, path)


# ---------------------------------------------------------------- 10. the checkpoint pair
def test_an_interrupted_save_leaves_the_old_pair(tmp_path, monkeypatch):
    model, ids, path = saved_routers(tmp_path)
    old = load_file(str(path / "routers.safetensors"))
    em = el.elastify(model, mlp_tokens=0.5, attn_heads=0.5)
    with torch.no_grad():
        for p in em.router_parameters():
            p.fill_(0.5)

    def killed_writing_the_metadata(obj, **kwargs):
        if "indent" in kwargs:  # routers.json, written after the weights
            raise KeyboardInterrupt  # SIGTERM/Ctrl-C between writing the weights and the metadata
        return json.dumps(obj, **kwargs)

    monkeypatch.setattr(elastilab.core.checkpoint, "json", types.SimpleNamespace(dumps=killed_writing_the_metadata))
    with pytest.raises(KeyboardInterrupt):
        em.save_routers(path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["routers.json", "routers.safetensors"]
    loaded = el.load_routers(em.unelastify(), path).router_state()
    assert all(torch.equal(loaded[k].nan_to_num(), old[k].nan_to_num()) for k in old)


def test_a_save_killed_after_its_commit_point_reads_as_the_new_pair(tmp_path, monkeypatch):
    model, ids, path = saved_routers(tmp_path)
    em = el.elastify(model, mlp_tokens=0.5, attn_heads=0.5)
    with torch.no_grad():
        for p in em.router_parameters():
            p.fill_(0.5)
    calls = []
    finish = elastilab.files._finish

    def killed_after_one_file(pending, names):
        calls.append(pending)
        if len(calls) == 2 and pending.is_dir():  # the second call moves the committed files in
            f = sorted(pending.iterdir())[0]
            os.replace(f, pending.parent / f.name)
            raise KeyboardInterrupt
        finish(pending, names)

    monkeypatch.setattr(elastilab.files, "_finish", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        em.save_routers(path)
    monkeypatch.undo()
    assert (path / ".routers.pending").is_dir()
    new = {k: v.clone() for k, v in em.router_state().items()}
    loaded = el.load_routers(em.unelastify(), path)
    assert all(torch.equal(v.nan_to_num(), new[k].nan_to_num()) for k, v in loaded.router_state().items())
    loaded.save_routers(path)  # the next save completes the move and cleans up
    assert sorted(p.name for p in path.iterdir()) == ["routers.json", "routers.safetensors"]


def test_stale_temporaries_of_killed_runs_are_removed_on_the_next_save(tmp_path):
    model, _, path = saved_routers(tmp_path)
    (path / ".routers.safetensors.abc123_x.tmp").write_bytes(b"half")  # tempfile's 8 random characters
    (path / ".routers.json.def456yz.tmp").write_text("{")
    (path / ".routers.ghi789ab.tmp").mkdir()
    (path / ".routers.ghi789ab.tmp" / "routers.json").write_text("{")
    (path / "log.csv").write_text("step\n")  # not ours: kept
    # look-alikes a user could own: another name, another length, a folder holding other files
    (path / ".routers.my-notes.tmp").write_text("mine")
    (path / ".routers.json.abc.tmp").write_text("mine")
    (path / ".routers.zzzzzzzz.tmp").mkdir()
    (path / ".routers.zzzzzzzz.tmp" / "notes.txt").write_text("mine")
    (path / ".routers.yyyyyyyy.tmp" / "routers.json").mkdir(parents=True)  # a folder with a unit file's name
    (path / ".routers.yyyyyyyy.tmp" / "routers.json" / "notes.txt").write_text("mine")
    el.load_routers(model, path).save_routers(path)
    assert sorted(p.name for p in path.iterdir()) == [
        ".routers.json.abc.tmp", ".routers.my-notes.tmp", ".routers.yyyyyyyy.tmp", ".routers.zzzzzzzz.tmp", "log.csv",
        "routers.json", "routers.safetensors"]
    assert (path / ".routers.zzzzzzzz.tmp" / "notes.txt").read_text() == "mine"
    assert (path / ".routers.yyyyyyyy.tmp" / "routers.json" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 12. no pickles from the cache
class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)  # runs when unpickled


def test_a_pickle_planted_in_the_cache_is_never_run(tmp_path, monkeypatch):
    from elastilab.zoo import tiny_llava as tl
    monkeypatch.setenv("ELASTILAB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load would unpickle anything
    items = [{"image": None}] * 3
    monkeypatch.setattr(tl, "examples", lambda split: items)
    monkeypatch.setattr(tl, "tower_features", lambda model, images: torch.zeros(3, 2))
    folder = tmp_path / "tiny-llava-features"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    torch.save(_Planted(str(marker)), folder / "train-3.pt")  # the cache file of earlier versions
    _, feats = tl.cached_features(None, "train")
    assert not marker.exists() and torch.equal(feats, torch.zeros(3, 2))
    assert torch.equal(tl.cached_features(None, "train")[1], feats)  # read back from safetensors


def test_the_library_never_calls_torch_load():
    root = os.path.dirname(el.__file__)
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                assert "torch.load(" not in open(os.path.join(folder, f)).read(), f


# ---------------------------------------------------------------- 6. shipped results are never a default output
@pytest.mark.parametrize("argv, module, runs", [
    (["vit", "bench"], "elastilab.analysis.vision", "bench"),
    (["vit", "crossdomain"], "elastilab.analysis.vision", "crossdomain"),
    (["vlm", "train"], "elastilab.zoo.tiny_llava", "load"), (["vlm", "bench"], "elastilab.zoo.tiny_llava", "load"),
    (["zoo", "tiny-llava-train"], "elastilab.zoo.tiny_llava_train", "train"),
    (["zoo", "dinov2-probe"], "elastilab.zoo.dinov2", "train_probe"),
    (["bench", "speed", "--model", "tiny"], "elastilab.analysis.bench", "speed"),
])
def test_benchmark_commands_write_only_where_out_says(monkeypatch, capsys, argv, module, runs):
    import functools
    import importlib

    from elastilab.cli import main as cli
    mod = importlib.import_module(module)  # wraps: the parser still reads the function's defaults
    monkeypatch.setattr(mod, runs,
                        functools.wraps(getattr(mod, runs))(lambda *a, **k: pytest.fail("ran without --out")))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_benchmark_functions_write_nothing_by_default():
    from elastilab.analysis import vlm
    with pytest.raises(ValueError, match="out is required"):
        vlm.train_visual_router()
    assert vlm.bench.__defaults__ is not None and "benchmarks/" not in str(vlm.bench.__defaults__)
