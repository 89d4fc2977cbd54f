"""Train a tiny CLIP on the toy world, contrastively, on CPU, with a fixed seed.

The model is an open_clip model-config JSON built by the product's own loader
(``load_encoder(config.json, "none")``); after training it is written with ``save_checkpoint`` and
loaded back with ``load_encoder(config.json, checkpoint)``, the ``--clip-model CONFIG.json
--pretrained PATH`` path users take.

Loss: a class-aware InfoNCE. Many images of one batch share a concept and every concept has many
captions, so instead of CLIP's one-hot diagonal the targets are uniform over all matching pairs:
image → every caption of its concept, caption → every image of its concept in the batch. Every
step encodes all captions (a few hundred short ones), so each image sees every phrasing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from bench.toyworld.world import NAMES, WORLD_VERSION, captions, single_concept_set

CACHE_ROOT = Path(__file__).resolve().parents[1] / "out" / "toyworld"  # bench/out/ is gitignored


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0  # seeds the world's training images, the initial weights and the batch order
    per_concept: int = 160  # training tiles per concept
    steps: int = 1000  # optimiser steps
    batch_size: int = 64  # images per step
    captions_per_concept: int = 4  # captions of every concept drawn for each step's text batch
    lr: float = 2e-3  # AdamW peak learning rate (linear warm-up, cosine decay)
    warmup: int = 40  # warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (not on gains, biases, embeddings or logit scale)
    embed_dim: int = 64  # joint embedding size
    image_size: int = 48  # ViT input side; 48 / 8 = 6×6 tokens, 2×2 per cell of a 3×3 mosaic
    vision_width: int = 96  # ViT width
    vision_layers: int = 3  # ViT blocks
    patch_size: int = 8  # ViT patch side
    text_width: int = 64  # text transformer width
    text_layers: int = 2  # text transformer blocks
    context_length: int = 16  # caption tokens (toy captions are short)
    threads: int = 1  # torch intra-op threads while training (1 is fastest on a small, shared CPU); 0 keeps torch's

    def model_config(self) -> dict:
        """The open_clip model-config JSON (``{embed_dim, vision_cfg, text_cfg}``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": 32, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": max(1, self.text_width // 32), "layers": self.text_layers, "mlp_ratio": 2.0},
        }

    def key(self) -> str:
        """Hash of everything that changes the checkpoint (settings, world version); names the cache folder."""
        settings = {k: v for k, v in asdict(self).items() if k != "threads"}
        blob = json.dumps({"world": self.world_version(), "settings": settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def world_version(self):
        """Version of the generator whose images train this model (part of the cache key)."""
        return WORLD_VERSION

    def training_set(self, encoder):
        """(batch(idx) → (b, 3, S, S) pixels, (N,) labels, captions per label) of single-concept tiles."""
        import torch
        from PIL import Image

        images, labels = single_concept_set(self.seed, self.per_concept, 64)
        pixels = encoder.preprocess([Image.fromarray(a) for a in images])  # the product's resize + normalise
        return (lambda idx: pixels[idx]), torch.from_numpy(labels), [captions(name) for name in NAMES]


@dataclass(frozen=True)
class SceneSettings(TrainSettings):
    """Scene world (issue 13): views of cluttered scenes labelled with their salient object or "clutter"."""

    views: int = 10000  # training views (squash-resized to image_size, like a product crop)
    views_per_scene: int = 12  # views cut from each generated scene
    steps: int = 2400  # optimiser steps
    batch_size: int = 64  # images per step
    per_concept: int = 0  # unused (tile-world setting)

    def world_version(self):
        from bench.toyworld.scene import SCENE_VERSION

        return {"tiles": WORLD_VERSION, "scene": SCENE_VERSION}

    def training_set(self, encoder):
        """(batch(idx) → (b, 3, S, S) pixels, (N,) labels, captions per label) of scene views."""
        import torch

        from bench.toyworld.scene import CLUTTER_CAPTIONS, training_views

        arrays, labels = training_views(self.seed, self.views, self.image_size, self.views_per_scene,
                                        resample=encoder._resample)
        caps = [captions(name) for name in NAMES] + [list(CLUTTER_CAPTIONS)]
        return (lambda idx: encoder._to_pixels(arrays[idx.numpy()])), torch.from_numpy(labels), caps


@dataclass(frozen=True)
class TrainedModel:
    config_path: Path  # open_clip model-config JSON (--clip-model)
    checkpoint_path: Path  # safetensors weights (--pretrained)
    losses: tuple[float, ...] = field(repr=False)  # training loss at every step
    seconds: float  # training wall time (of the run that made the checkpoint)
    cached: bool  # True when loaded from the cache instead of trained now


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def soft_infonce(img, txt, scale, img_labels, txt_labels):
    """Class-aware symmetric InfoNCE.

    Parameters
    ----------
    img : (B, D) normalised image embeddings; txt : (T, D) normalised caption embeddings
    scale : 0-d tensor, the logit scale s
    img_labels : (B,) concept of each image; txt_labels : (T,) concept of each caption

    Returns
    -------
    0-d tensor: mean of image→caption and caption→image cross-entropies with uniform targets over matches.
    """
    import torch

    logits = scale * img @ txt.T  # (B, T)
    match = (img_labels[:, None] == txt_labels[None, :]).float()  # (B, T)
    i2t = -(match / match.sum(1, keepdim=True) * torch.log_softmax(logits, 1)).sum(1).mean()
    present = match.sum(0) > 0  # captions whose concept appears in the batch
    m_t = match[:, present]
    t2i = -(m_t / m_t.sum(0, keepdim=True) * torch.log_softmax(logits[:, present], 0)).sum(0).mean()
    return (i2t + t2i) / 2


def train(settings: TrainSettings, out_dir: Path, log: Callable[[str], None] | None = None) -> TrainedModel:
    """Train from scratch and write ``model.json``, ``model.safetensors`` and ``train.json`` to ``out_dir``."""
    import torch

    from guardalign.models.clip import load_encoder, save_checkpoint

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "model.json"
    config_path.write_text(json.dumps(settings.model_config(), indent=2))
    old_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random weights" warning: we are about to train them
            torch.manual_seed(settings.seed)
            encoder = load_encoder(str(config_path), "none", device="cpu")
            losses = _fit(encoder, settings, log)
    finally:
        torch.set_num_threads(old_threads)
    ckpt = save_checkpoint(encoder.model, out_dir / "model.safetensors")
    seconds = time.perf_counter() - t0
    (out_dir / "train.json").write_text(json.dumps({"settings": asdict(settings), "losses": losses,
                                                    "seconds": seconds, "world_version": settings.world_version()}))
    return TrainedModel(config_path, ckpt, tuple(losses), seconds, cached=False)


def _fit(encoder, settings: TrainSettings, log) -> list[float]:
    import torch

    model = encoder.model.train()
    model.token_embedding.weight.requires_grad_(False)  # random fixed token vectors: saves ~3M Adam updates
    batch_of, img_labels, caps = settings.training_set(encoder)
    tokens = [encoder.tokenizer(c) for c in caps]  # per label: (n_k, context_length)

    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(settings.seed)
    k = settings.captions_per_concept
    txt_labels = torch.arange(len(caps)).repeat_interleave(k)
    losses = []
    for step in range(settings.steps):
        lr = settings.lr * min(1.0, (step + 1) / settings.warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(img_labels), (settings.batch_size,), generator=gen)
        batch = batch_of(idx)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        text = torch.cat([t[torch.randint(0, len(t), (k,), generator=gen)] for t in tokens])
        img = model.encode_image(batch, normalize=True)
        txt = model.encode_text(text, normalize=True)
        loss = soft_infonce(img, txt, model.logit_scale.exp(), img_labels[idx], txt_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        if log and (step % 100 == 0 or step == settings.steps - 1):
            log(f"step {step:4d}/{settings.steps}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}")
    model.eval()
    encoder.clear_text_cache()
    return losses


def cached_model(settings: TrainSettings, root: Path = CACHE_ROOT, log: Callable[[str], None] | None = None) -> TrainedModel:
    """The checkpoint for ``settings`` from ``root/<settings.key()>/``, training it first if absent.

    Training happens in a temporary sibling folder that is renamed into place, so an interrupted
    run never leaves a half-written cache entry.
    """
    final = Path(root) / settings.key()
    meta = final / "train.json"
    if meta.is_file() and (final / "model.safetensors").is_file() and (final / "model.json").is_file():
        info = json.loads(meta.read_text())
        return TrainedModel(final / "model.json", final / "model.safetensors", tuple(info["losses"]),
                            float(info["seconds"]), cached=True)
    tmp = Path(root) / f".{settings.key()}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = train(settings, tmp, log)
        if final.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return cached_model(settings, root, log)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainedModel(final / "model.json", final / "model.safetensors", result.losses, result.seconds, cached=False)


def load_trained(model: TrainedModel, device: str = "cpu"):
    """Load a trained toy CLIP through the product path: ``load_encoder(config.json, checkpoint)``."""
    from guardalign.models.clip import load_encoder

    return load_encoder(str(model.config_path), str(model.checkpoint_path), device=device)


def settings_for(quick: bool) -> TrainSettings:
    """The bench's settings: full (about 80 s of training on 2 CPU cores) or quick (about 20 s)."""
    if quick:
        return TrainSettings(per_concept=48, steps=150, batch_size=96)
    return TrainSettings()


__all__ = ["TrainSettings", "SceneSettings", "scene_settings_for", "TrainedModel", "train", "cached_model", "load_trained", "soft_infonce",
           "settings_for", "CACHE_ROOT"]


def scene_settings_for(quick: bool) -> SceneSettings:
    """The scene world's settings: full (about 5 min of training on 2 shared CPU cores) or quick (about 1 min)."""
    if quick:
        return SceneSettings(views=3000, steps=300, batch_size=64)
    return SceneSettings()
