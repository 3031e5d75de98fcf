"""Synthetic scenes: a seeded, offline VQA set where *which* image tokens a VLM keeps matters.

Each scene is a 112 x 112 RGB image (tiny-llava's input: 8 x 8 patches of 14 px, plus CLS) with a
plain, lightly textured background and 1-4 flat shapes (circle, square, triangle in red, green, blue,
yellow), each 14-20 px across, so it touches 2-9 patches and mostly 4: most patches are background.
Every scene comes with one question whose answer is one word (one SmolLM2 token, distinct first tokens):

    colour    "What colour is the circle?"                   -> red | green | blue | yellow
    count     "How many shapes are there?"                   -> one | two | three | four
    exists    "Is there a triangle?"                         -> yes | no
    position  "Is the red shape on the left or the right?"   -> left | right

The scene is built *for* its answer (the colour question's shape is the only one of its kind, the
position question's colour is the only one of its colour and lies clearly left or right of the middle),
so question types and answers are balanced by construction: item i of a split asks type i % 4 with
answer (i // 4) % n_answers. Everything is drawn from ``numpy.random.default_rng((SPLIT_SEED[split], i))``:
the same split and index give the same scene on any machine, and train and test never share a seed.

Each item carries the objects' patches: ``patches`` (patch indices r * 8 + c that any pixel of any
object falls in; image token 1 + p in tiny-llava, token 0 is CLS), ``target_patches`` (those of the
object the question is about; all objects for count and a "no" existence question) and ``objects``
(shape, colour, bounding box, patches).

    items = scenes.examples("test", 400)     # 100 questions of each type
    items[0]["image"], items[0]["question"], items[0]["answer"], items[0]["patches"]
"""
from __future__ import annotations

import numpy as np

SIZE, PATCH = 112, 14
GRID = SIZE // PATCH
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 20)}
COUNT_WORDS = ("one", "two", "three", "four")
ANSWERS = {"colour": tuple(COLOURS), "count": COUNT_WORDS, "exists": ("yes", "no"), "position": ("left", "right")}
QUESTION_TYPES = tuple(ANSWERS)
TASKS = tuple(f"scene_{t}" for t in QUESTION_TYPES)  #: the ``task`` of each item, per question type
SPLIT_SEED = {"train": 1_000, "test": 2_000}
MIN_SIDE, MAX_SIDE, GAP = 14, 20, 3
MIDDLE = (50, 62)  # a position question's object centre lies left of 50 px or right of 62 px


def question(qtype: str, subject: str = "") -> str:
    return {"colour": f"What colour is the {subject}?", "count": "How many shapes are there?",
            "exists": f"Is there a {subject}?", "position": f"Is the {subject} shape on the left or the right?"}[qtype]


def _mask(shape: str, box) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of one shape filling the box (x0, y0, side)."""
    from PIL import Image, ImageDraw
    x0, y0, s = box
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    x1, y1 = x0 + s - 1, y0 + s - 1
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=255)
    else:
        d.polygon([(x0 + (s - 1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    return np.asarray(img) > 0


def patches_of(mask: np.ndarray) -> list[int]:
    """Indices r * GRID + c of the patches holding any pixel of the mask."""
    m = mask.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3))
    return [int(i) for i in np.flatnonzero(m)]


def _place(rng, n: int, x_range=None) -> list[tuple[int, int, int]] | None:
    """n non-overlapping boxes (x0, y0, side), at least GAP px apart; the first one's centre within
    x_range if given. None if the draw failed (the caller redraws)."""
    boxes = []
    for k in range(n):
        for _ in range(100):
            s = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x0, y0 = (int(v) for v in rng.integers(2, SIZE - s - 1, size=2))
            if k == 0 and x_range is not None and not x_range[0] <= x0 + s / 2 <= x_range[1]:
                continue
            if all(x0 + s + GAP <= bx or bx + bs + GAP <= x0 or y0 + s + GAP <= by or by + bs + GAP <= y0
                   for bx, by, bs in boxes):
                boxes.append((x0, y0, s))
                break
        else:
            return None
    return boxes


def _background(rng) -> np.ndarray:
    """A light, low-saturation colour with a faint gradient and pixel noise: float [SIZE, SIZE, 3]."""
    base = rng.uniform(165, 230) + rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1, 1, SIZE)
    grad = rng.uniform(-10, 10) * ramp[None, :, None] + rng.uniform(-10, 10) * ramp[:, None, None]
    return base + grad + rng.normal(0, 4, size=(SIZE, SIZE, 3))


def _objects(rng, qtype: str, answer: str):
    """(objects [(shape, colour)], subject of the question, index of the target object or None,
    x_range of the first object's centre or None) for a scene whose answer to qtype is ``answer``."""
    colours = list(COLOURS)
    if qtype == "count":
        n = COUNT_WORDS.index(answer) + 1
        return [(SHAPES[rng.integers(3)], colours[rng.integers(4)]) for _ in range(n)], "", None, None
    n = int(rng.integers(1, 5))
    if qtype == "colour":
        shape = SHAPES[rng.integers(3)]
        others = [s for s in SHAPES if s != shape]
        objs = [(shape, answer)] + [(others[rng.integers(2)], colours[rng.integers(4)]) for _ in range(n - 1)]
        return objs, shape, 0, None
    if qtype == "exists":
        shape = SHAPES[rng.integers(3)]
        others = [s for s in SHAPES if s != shape]
        objs = [(others[rng.integers(2)], colours[rng.integers(4)]) for _ in range(n)]
        if answer == "yes":
            objs[0] = (shape, colours[rng.integers(4)])
        return objs, shape, (0 if answer == "yes" else None), None
    colour = colours[rng.integers(4)]
    others = [c for c in colours if c != colour]
    objs = [(SHAPES[rng.integers(3)], colour)] + [(SHAPES[rng.integers(3)], others[rng.integers(3)])
                                                  for _ in range(n - 1)]
    x_range = (MIN_SIDE / 2 + 2, MIDDLE[0]) if answer == "left" else (MIDDLE[1], SIZE - MIN_SIDE / 2 - 2)
    return objs, colour, 0, x_range


def scene(seed, qtype: str, answer: str) -> dict:
    """One scene built for (qtype, answer) from ``seed`` (anything numpy's default_rng takes):
    {image uint8 [112, 112, 3], question, answer, task, qtype, objects, patches, target_patches}."""
    if qtype not in ANSWERS or answer not in ANSWERS[qtype]:
        raise ValueError(f"no {qtype!r} question with answer {answer!r}; types and answers: {ANSWERS}")
    rng = np.random.default_rng(seed)
    while True:
        objs, subject, target, x_range = _objects(rng, qtype, answer)
        boxes = _place(rng, len(objs), x_range)
        if boxes is not None:
            break
    order = rng.permutation(len(objs))  # the target is not always drawn first
    img = _background(rng)
    objects, masks = [], []
    for k in order:
        (shape, colour), box = objs[k], boxes[k]
        m = _mask(shape, box)
        rgb = np.asarray(COLOURS[colour], float) + rng.uniform(-15, 15, size=3)
        img[m] = rgb + rng.normal(0, 3, size=(int(m.sum()), 3))
        objects.append({"shape": shape, "colour": colour, "box": list(box), "patches": patches_of(m),
                        "target": bool(k == target)})
        masks.append(m)
    everything = patches_of(np.any(masks, axis=0))
    tgt = [o["patches"] for o in objects if o["target"]]
    return {"image": np.clip(np.round(img), 0, 255).astype(np.uint8), "question": question(qtype, subject),
            "answer": answer, "task": f"scene_{qtype}", "qtype": qtype, "objects": objects,
            "patches": everything, "target_patches": tgt[0] if tgt else everything}


def examples(split: str = "train", n: int | None = None, start: int = 0) -> list[dict]:
    """Items ``start .. start + n - 1`` of a split (default n: 1200 train, 400 test); item i asks
    question type i % 4 with answer (i // 4) % n_answers, from seed (SPLIT_SEED[split], i)."""
    if split not in SPLIT_SEED:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEED)}, got {split!r}")
    n = n if n is not None else (1200 if split == "train" else 400)
    out = []
    for i in range(start, start + n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        answers = ANSWERS[qtype]
        out.append(scene((SPLIT_SEED[split], i), qtype, answers[(i // len(QUESTION_TYPES)) % len(answers)]))
    return out
