"""Synthetic scenes (elastilab.zoo.scenes) and the tiny-llava scenes frontier."""
import collections
import hashlib
import json

import numpy as np
import pytest

from elastilab.zoo import scenes


def _digest(item) -> str:
    return hashlib.sha256(item["image"].tobytes()).hexdigest()


def test_a_scene_is_a_function_of_its_seed():
    a, b = scenes.examples("test", 12), scenes.examples("test", 12)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"])
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
    assert np.array_equal(scenes.examples("test", 1, start=5)[0]["image"], a[5]["image"])  # no hidden state
    assert not np.array_equal(scenes.scene(1, "count", "two")["image"], scenes.scene(2, "count", "two")["image"])
    x = a[0]["image"]
    assert x.shape == (112, 112, 3) and x.dtype == np.uint8


def test_train_and_test_splits_are_disjoint():
    train = {_digest(it) for it in scenes.examples("train", 400)}
    test = {_digest(it) for it in scenes.examples("test", 400)}
    assert len(train) == len(test) == 400  # no duplicates within a split either
    assert not train & test
    assert scenes.SPLIT_SEED["train"] != scenes.SPLIT_SEED["test"]
    with pytest.raises(ValueError, match="split must be"):
        scenes.examples("val")


def test_question_types_and_answers_are_balanced():
    items = scenes.examples("test", 400)
    assert collections.Counter(it["task"] for it in items) == {t: 100 for t in scenes.TASKS}
    for qtype, answers in scenes.ANSWERS.items():
        counts = collections.Counter(it["answer"] for it in items if it["qtype"] == qtype)
        assert counts == {a: 100 // len(answers) for a in answers}, qtype
    sizes = collections.Counter(len(it["objects"]) for it in items)
    assert set(sizes) == {1, 2, 3, 4}


def test_answers_are_true_of_the_scene():
    for it in scenes.examples("train", 200):
        objs, q = it["objects"], it["question"]
        if it["qtype"] == "count":
            assert scenes.COUNT_WORDS[len(objs) - 1] == it["answer"]
        elif it["qtype"] == "colour":
            shape = q.split()[-1].rstrip("?")
            (only,) = [o for o in objs if o["shape"] == shape]
            assert only["colour"] == it["answer"] and only["target"]
        elif it["qtype"] == "exists":
            shape = q.split()[-1].rstrip("?")
            assert any(o["shape"] == shape for o in objs) == (it["answer"] == "yes")
        else:
            colour = q.split()[2]
            (only,) = [o for o in objs if o["colour"] == colour]
            x0, _, s = only["box"]
            centre = x0 + s / 2
            assert (centre < scenes.MIDDLE[0]) if it["answer"] == "left" else (centre > scenes.MIDDLE[1])


def test_objects_land_in_the_patches_the_metadata_says():
    for it in scenes.examples("test", 80):
        rgb = it["image"].astype(int)
        saturated = rgb.max(-1) - rgb.min(-1) > 60  # the shapes are saturated colours, the background is not
        assert scenes.patches_of(saturated) == it["patches"]
        union = sorted({p for o in it["objects"] for p in o["patches"]})
        assert union == it["patches"]
        assert set(it["target_patches"]) <= set(it["patches"])
        for o in it["objects"]:
            assert 1 <= len(o["patches"]) <= 9
            x0, y0, s = o["box"]
            assert scenes.MIN_SIDE <= s <= scenes.MAX_SIDE and 0 <= x0 and x0 + s <= 112 and y0 + s <= 112
            inside = saturated[y0:y0 + s, x0:x0 + s]
            assert inside.mean() > 0.4  # the shape is drawn where its box says
            assert scenes.patches_of(np.pad(inside, ((y0, 112 - y0 - s), (x0, 112 - x0 - s)))) == o["patches"]
        assert len(it["patches"]) <= 32  # most patches are background


@pytest.mark.slow
def test_answers_have_distinct_single_first_tokens_under_the_smollm2_tokenizer():
    from elastilab.zoo import smollm2, tiny_llava
    _, tok = smollm2.load()
    answers = [a for v in scenes.ANSWERS.values() for a in v]
    first = tiny_llava.first_token_ids(tok, answers).tolist()
    assert len(set(first)) == len(answers)
    for a in answers:  # one token each, so the first-token accuracy is the answer's accuracy
        assert len(tok.encode(a, add_special_tokens=False)) == 1, a


def test_tiny_llava_examples_include_the_scenes():
    from elastilab.zoo import tiny_llava
    tasks = dict(tiny_llava.TASK_WEIGHTS)
    assert set(scenes.TASKS) <= set(tasks)


@pytest.mark.slow
def test_the_scenes_frontier_runs_on_a_few_images(capsys):
    from elastilab.cli import main as cli
    assert cli.main(["frontier", "--model", "tiny-llava", "--routers", "data/routers/tiny-llava-visual",
                     "--domain", "scenes", "--n-images", "4", "--capacities", "0.5",
                     "--scorers", "learned,random,fastv", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["scorer"] for r in rows} == {"learned", "random", "fastv"}
    for r in rows:
        assert r["n"] == 4 and set(scenes.TASKS) <= {k[len("acc_"):] for k in r if k.startswith("acc_")}
        assert 0 <= r["object_patches_kept"] <= 1 and 0 <= r["agreement_scene_colour"] <= 1
        if r["capacity"] == 1.0:
            assert r["object_patches_kept"] == 1 and r["agreement"] == 1 and r["acc"] == r["teacher_acc"]
        else:
            assert r["image_tokens_kept"] == 33
    assert cli.main(["frontier", "--model", "tiny-llava", "--domain", "licenses", "--scorers", "random"]) == 2
    assert "tiny-llava takes --domain digits" in capsys.readouterr().err
