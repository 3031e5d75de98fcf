"""The visual-language self-distillation task: KL(teacher || student) on the answer tokens of
image-question pairs, their datasets (tiny-llava's digit and face questions), evaluation by the greedy
answer's first token, and parameter counts of the visual router against whole LLaVAs.

    items, feats = tiny_llava_data(model, tok, "train")
    el.distill(em, answer_dataset(tok, items, feats), loss_fn=answer_loss, steps=150)
    evaluate(em, tok, *tiny_llava_data(model, tok, "test"))
"""
from __future__ import annotations

import contextlib

import pandas as pd
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from elastilab.training.losses import kl_loss
from elastilab.zoo import tiny_llava


def predicting_positions(answer_mask: Tensor) -> Tensor:
    """Positions whose next-token prediction is an answer token (position t predicts token t+1)."""
    out = torch.zeros_like(answer_mask)
    out[:, :-1] = answer_mask[:, 1:]
    return out


def answer_loss(em, wrapped, batch: dict, cfg) -> tuple[Tensor, dict]:
    """``distill(loss_fn=answer_loss)``: KL(teacher || student) on the answer tokens of an image-text
    batch {input_ids, attention_mask, answer_mask, image_features} (see answer_dataset)."""
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              image_features=batch["image_features"], logits_at=predicting_positions(batch["answer_mask"]))
    with torch.no_grad(), em.routers_disabled():
        teacher = em(**kw).logits
    student = wrapped(**kw).logits
    kl = kl_loss(student, teacher, cfg.temperature)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl, {"kl": kl.detach().item(), "agreement": agree.item()}


def expand_tasks(tasks) -> tuple[str, ...]:
    """Task names with "scenes" standing for every scene question type (zoo.scenes.TASKS)."""
    from elastilab.zoo import scenes
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    out = tuple(dict.fromkeys(t for n in names for t in (scenes.TASKS if n == "scenes" else (n,))))
    known = ("digit", "face") + scenes.TASKS
    bad = [t for t in out if t not in known]
    if bad or not out:
        raise ValueError(f"unknown tasks {bad or names}; choose from digit, face, scenes, {', '.join(scenes.TASKS)}")
    return out


def tiny_llava_data(model, tokenizer, split: str, per_class: int | None = None, faces: int | None = None,
                    tasks=("digit", "face"), scenes: int | None = None):
    """(items, projected image features) of tiny-llava's questions of the given ``tasks`` (digit, face,
    "scenes" or single scene question types; captions are left out: one answer length keeps batches
    unpadded). ``per_class``/``faces``/``scenes`` take the first few digits per class, faces per
    answer, scene questions (the first 16k scenes hold every answer of every type equally often)."""
    items, tower = tiny_llava.cached_features(model, split)
    tasks = expand_tasks(tasks)
    pick = [i for i, it in enumerate(items) if it["task"] in tasks]
    if scenes:
        scene_idx = set([i for i in pick if is_scene(items[i])][:scenes])
        pick = [i for i in pick if not is_scene(items[i]) or i in scene_idx]
    if per_class or faces:
        seen: dict = {}
        keep = []
        for i in pick:
            key = (items[i]["task"], items[i]["answer"])
            limit = {"digit": per_class, "face": faces}.get(items[i]["task"])
            if limit is None or seen.get(key, 0) < limit:
                seen[key] = seen.get(key, 0) + 1
                keep.append(i)
        pick = keep
    with torch.no_grad():
        feats = model.model.multi_modal_projector(tower[pick])
    return [items[i] for i in pick], feats


def is_scene(item) -> bool:
    return item["task"].startswith("scene_")


def answer_dataset(tokenizer, items, image_features: Tensor) -> list[dict]:
    """Items (tiny_llava.examples) and their projected features -> equal-length dicts for distill()."""
    b = tiny_llava.text_batch(tokenizer, [it["question"] for it in items], [it["answer"] for it in items])
    return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
             "answer_mask": b["answer_mask"][i], "image_features": image_features[i]} for i in range(len(items))]


@torch.no_grad()
def evaluate(em, tokenizer, items, image_features: Tensor, batch_size: int = 16, measure: bool = True,
             teacher_cache: dict | None = None, per_item: bool = False) -> dict:
    """Accuracy of the greedy answer's first token (per task) for teacher and student, student-teacher
    agreement on it (overall and per task), KL on it, image tokens kept, and the measured FLOPs of the
    LM + head relative to the teacher (first batch; features are precomputed so the tower does not count).
    Items with object patches (zoo.scenes) also give ``object_patches_kept`` / ``target_patches_kept``:
    the share of the patches covered by any object / by the object asked about whose image token was
    kept (token 1 + patch; token 0 is CLS). ``teacher_cache``: a dict kept between calls on the same
    items and model, so the teacher runs once (not with ``measure``). ``per_item``: also ``res["per_item"]``,
    the teacher's and the student's hits and their agreement per item (0/1 lists, for paired comparisons)."""
    tally, flops, kept = _Tally(), {}, None
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        b = tiny_llava.text_batch(tokenizer, [it["question"] for it in chunk], [it["answer"] for it in chunk])
        first = b["answer_mask"] & ~torch.roll(b["answer_mask"], 1, 1)
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  image_features=image_features[s:s + batch_size], logits_at=predicting_positions(first))
        t_logits, s_logits, kept = _answer_logits(em, kw, (s, batch_size, len(items)), teacher_cache,
                                                  flops if measure and s == 0 else None)
        gold = tiny_llava.first_token_ids(tokenizer, [it["answer"] for it in chunk])
        tally.add(chunk, t_logits, s_logits, kept, gold)
    res = tally.result(len(items))
    res["image_tokens_kept"] = int(kept[0].sum()) if kept is not None else image_features.shape[1]
    if flops:
        res["flops_fraction"] = flops["student"] / flops["teacher"]
    if per_item:
        res["per_item"] = tally.per_item
    return res


def _answer_logits(em, kw: dict, key: tuple, teacher_cache: dict | None, flops: dict | None):
    """(teacher logits, student logits, the student's image keep mask) of one batch. The teacher's come from
    ``teacher_cache`` when it holds ``key``, except when measuring: ``flops`` (a dict) then gets each forward's
    FLOPs by who ran it."""
    cached = teacher_cache is not None and flops is None and key in teacher_cache
    t_logits = teacher_cache[key] if cached else None
    for who in ("student",) if cached else ("teacher", "student"):
        with em.routers_disabled() if who == "teacher" else contextlib.nullcontext():
            if flops is not None:
                with FlopCounterMode(display=False) as fc:
                    out = em(**kw)
                flops[who] = fc.get_total_flops()
            else:
                out = em(**kw)
        if who == "teacher":
            t_logits = out.logits
            if teacher_cache is not None:
                teacher_cache[key] = t_logits
    return t_logits, out.logits, out.image_keep  # out: the student's, which runs last


class _Tally:
    """What ``evaluate`` sums over its batches: per task the teacher's and the student's first-token hits and
    their agreement, per item the same (0/1), the object and target patches kept, agreement and KL."""

    def __init__(self):
        self.teacher: dict = {}
        self.student: dict = {}
        self.same: dict = {}
        self.per_item: dict = {"teacher": [], "student": [], "agree": []}
        self.patches = {"object": [0, 0], "target": [0, 0]}  # [kept, total]
        self.agree = self.kl = 0.0

    def add(self, chunk, t_logits: Tensor, s_logits: Tensor, kept: Tensor | None, gold: Tensor) -> None:
        same = (t_logits.argmax(-1) == s_logits.argmax(-1)).tolist()
        hits = zip(chunk, (t_logits.argmax(-1) == gold).tolist(), (s_logits.argmax(-1) == gold).tolist(), same)
        for j, (it, ot, os_, agree) in enumerate(hits):
            self.teacher.setdefault(it["task"], []).append(ot)
            self.student.setdefault(it["task"], []).append(os_)
            self.same.setdefault(it["task"], []).append(agree)
            for k, v in (("teacher", ot), ("student", os_), ("agree", agree)):
                self.per_item[k].append(int(v))
            if "patches" in it:
                for name, field in (("object", "patches"), ("target", "target_patches")):
                    p = torch.tensor(it[field], dtype=torch.long) + 1
                    self.patches[name][0] += int(kept[j, p].sum()) if kept is not None else len(p)
                    self.patches[name][1] += len(p)
        self.agree += sum(same)
        self.kl += kl_loss(s_logits, t_logits).item() * len(chunk)

    def result(self, n: int) -> dict:
        res: dict = {"n": n}
        for t in self.teacher:
            res[f"teacher_acc_{t}"] = sum(self.teacher[t]) / len(self.teacher[t])
            res[f"acc_{t}"] = sum(self.student[t]) / len(self.student[t])
        for t in self.teacher:
            res[f"agreement_{t}"] = sum(self.same[t]) / len(self.same[t])
        for name, (hit, total) in self.patches.items():
            if total:
                res[f"{name}_patches_kept"] = hit / total
        res["teacher_acc"] = sum(sum(v) for v in self.teacher.values()) / n
        res["acc"] = sum(sum(v) for v in self.student.values()) / n
        res["agreement"] = self.agree / n
        res["kl"] = self.kl / n
        return res


def llava_parameter_count(config) -> dict:
    """Parameters of a LlavaForConditionalGeneration built from ``config`` on the meta device (no
    weights, no memory), and the fraction one visual-token router Linear(d_lm, 1) adds."""
    from transformers import LlavaForConditionalGeneration
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    d = config.text_config.hidden_size
    return {"params": total, "d_lm": d, "visual_router_params": d + 1, "fraction": (d + 1) / total}


def llava_15_7b_config():
    """LLaVA-1.5-7B's configuration from its published numbers: CLIP ViT-L/14 at 336 px (24 layers,
    d=1024, penultimate layer, 576 patch tokens), a 2-layer GELU MLP projector, Vicuna-7B (Llama:
    32 layers, d=4096, 32 heads, FFN 11008) with vocab 32064 (the llava-hf release, <image> added)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


class VLMTask:
    """Visual-language quality on held-out questions: accuracy of the greedy answer's first token
    (digits and faces of tiny-llava), agreement and KL with the teacher. ``items`` and the projected
    ``image_features`` as ``elastilab.tasks.vlm.tiny_llava_data`` returns them."""

    metric, higher_is_better = "acc", True

    def __init__(self, tokenizer, items, image_features: torch.Tensor, batch_size: int = 16):
        if len(items) != len(image_features) or not items:
            raise ValueError(f"VLMTask needs one image per item, got {len(items)} items and "
                             f"{len(image_features)} images")
        self.tokenizer, self.items, self.features, self.batch_size = tokenizer, items, image_features, batch_size
        self._teacher: dict = {}  # the teacher's logits per batch, computed once per model
        self._teacher_of = None
        self.records: list[dict] = []

    def per_item_table(self) -> pd.DataFrame:
        """One row per item (task, answer), the teacher's hit, and per evaluation so far
        ("<selector>@<capacity>") the student's hit and its agreement with the teacher (0/1)."""
        cols = {"task": [it["task"] for it in self.items], "answer": [it["answer"] for it in self.items]}
        for rec in self.records:
            cols.setdefault("teacher", rec["teacher"])
            name = f"{rec['selector']}@{rec['capacity']:g}"
            cols[name], cols[f"{name}_agree"] = rec["student"], rec["agree"]
        return pd.DataFrame(cols)

    def measure_input(self, em):
        from elastilab.zoo.tiny_llava import text_batch
        it = self.items[0]
        b = text_batch(self.tokenizer, [it["question"]], [it["answer"]])
        return (), dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_features=self.features[:1])

    def evaluate(self, em) -> dict:
        if self._teacher_of is not em:
            self._teacher, self._teacher_of = {}, em
        r = evaluate(em, self.tokenizer, self.items, self.features, self.batch_size, measure=False,
                     teacher_cache=self._teacher, per_item=True)
        # per-item hits of each evaluation, for paired comparisons between scorers (``per_item_table``)
        self.records.append({"selector": getattr(em, "selector", None),
                             "capacity": getattr(em, "visual_capacity", None), **r.pop("per_item")})
        return {"quality": r["acc"], **r}
