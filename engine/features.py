"""Method-aware features and logits for a model prepared by ``leanclip.prepare``.

    img = image_features(model, images)                          # (B, E) normalized; the method's feature hook
    txt = text_features(model, classnames, templates, tokenizer) # (C, E) normalized; template ensemble / CoOp prompts
    logits = class_logits(model, img, txt)                       # (B, C): logit_scale.exp() * cos, or the method head
    teacher = frozen_text_features(model, classnames, templates, tokenizer)   # no grad: CLIPFit teacher, zero-shot
    loss = CE(logits, y) + clipfit_kd_loss(txt, teacher, lam=8.0)

A method whose prompts depend on the image (the ``image_prompts`` hook: CoCoOp) has no class text features of its
own: ``text_features`` gives an :class:`ImageConditionedText` and ``class_logits`` runs the text tower on each image's
prompts (``(B, C)`` logits from ``(B, C, E)`` text features), so the callers keep one code path.

Lean models (``prepare(..., lean=True)``) encode text with the EOT-truncated context (``leanclip.lean.encode_text_lean``,
exact); plain ones run open_clip's ``encode_text`` over the full context (the baseline). Features come back in
float32 whatever the frozen-weight / autocast dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leanclip import lean as _lean
from leanclip.models import transformers as _hf
from leanclip.models.openclip import text_tower
from leanclip.registry import method_hooks
from leanclip.select import model_device

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CONDITIONED_PROMPTS_PER_PASS = 1024  # image-conditioned prompts (CoCoOp) per text-tower pass
_TOKEN_CACHE: dict = {}


def _uses_lean(model: nn.Module) -> bool:
    info = getattr(model, "leanclip_info", None)
    if info and "lean" in info.get("options", {}):
        return bool(info["options"]["lean"])
    return _lean.is_lean(model)


def _clean(name) -> str:
    return " ".join(str(name).replace("_", " ").split())


def check_classnames(classnames) -> list[str]:
    """``classnames`` as a list of strings; ValueError naming it when it is None, one string, or empty."""
    if classnames is None or isinstance(classnames, str):
        raise ValueError("classnames must be a non-empty list of strings")
    classnames = [str(c) for c in classnames]
    if not classnames:
        raise ValueError("classnames must be a non-empty list of strings")
    return classnames


def check_templates(templates) -> list[str]:
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates must not be empty")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"every template must be a string with a '{{}}' placeholder, got {t!r}")
    return templates


def tokenize(tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
    """``tokenizer(texts)`` as a CPU LongTensor (cached: prompts repeat every training step)."""
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("a tokenizer (callable: list[str] -> LongTensor) is needed to encode text")
    key = (id(tokenizer), tuple(texts))
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    tok = torch.as_tensor(tokenizer(list(texts)))
    if tok.dim() != 2:
        raise ValueError(f"tokenizer must return a 2-D tensor (N, L), got shape {tuple(tok.shape)}")
    if len(_TOKEN_CACHE) >= 16:
        _TOKEN_CACHE.clear()
    _TOKEN_CACHE[key] = (tokenizer, tok)
    return tok


def encode_tokens(model: nn.Module, tokens: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Unnormalized text embeddings (N, E) of ``tokens`` (lean: EOT-truncated per chunk; plain: open_clip)."""
    tokens = tokens.to(model_device(model))
    lean = _uses_lean(model)
    chunks = [tokens] if not batch_size or tokens.shape[0] <= batch_size else tokens.split(int(batch_size))
    outs = [(_lean.encode_text_lean(model, c) if lean else model.encode_text(c)) for c in chunks]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, E) float32 output of the bare image encoder (no method head, not normalized): what the feature cache
    stores. Images are cast to the patch-embedding weight's dtype (bf16 frozen weights)."""
    conv = getattr(model.visual, "conv1", None)
    if conv is not None and images.dtype != conv.weight.dtype and images.is_floating_point():
        images = images.to(conv.weight.dtype)
    return model.encode_image(images).float()


def image_features(model: nn.Module, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """(B, E) float32 image features (L2-normalized unless ``normalize=False``): :func:`encode_images`, then
    CLIP-Adapter when the method has one."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return features_from_encoded(model, encode_images(model, images), normalize=normalize)


def features_from_encoded(model: nn.Module, encoded: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """:func:`image_features` of images whose :func:`encode_images` output is ``encoded`` (B, E): the method's
    feature hook (CLIP-Adapter) then the normalization, so features read from a cache of the bare encoder get exactly
    the operations a fresh batch gets."""
    f = encoded.float()
    adapter = method_hooks(model).get("image_features")
    if adapter is not None:
        f = adapter(f)
    return F.normalize(f, dim=-1) if normalize else f


@dataclass(frozen=True)
class ImageConditionedText:
    """The class text side of a model whose prompts are conditioned on the image (``image_prompts`` hook): the class
    names and tokenizer its prompts are built from. Nothing is computed until :func:`class_logits` sees the image
    features, so it holds no graph (``requires_grad`` False, ``detach`` itself): the text tower runs, and its
    gradient flows, inside each batch's forward."""
    classnames: tuple
    tokenizer: Callable
    requires_grad = False

    def detach(self) -> "ImageConditionedText":
        return self


def _prompted_text(model: nn.Module, learner: nn.Module, classnames: list, tokenizer, **kw) -> torch.Tensor:
    """Normalized float32 text features of a prompt learner's prompts (``kw``: what the learner takes besides the
    names, e.g. CoCoOp's image features): the family's own forward for ``transformers`` models, else the open_clip
    text tower fed the learner's embeddings, cut to the prompts' end-of-text (lean) or the full context."""
    if _hf.is_transformers(model):  # the family's own forward, context spliced in
        emb, tok = learner(_hf.token_embedding(model), classnames, tokenizer, **kw)
        return F.normalize(_hf.encode_text_embeddings(model, tok, emb).float(), dim=-1)
    t = text_tower(model)
    tok = learner.tokens(classnames, tokenizer)
    length = _lean.eot_length(model, tok) if _uses_lean(model) else tok.shape[1]
    emb, tok = learner(t.token_embedding, classnames, tokenizer, max_len=length, **kw)
    f = _lean.encode_text_lean(model, tok, prompt_embeddings=emb, truncate=False)
    return F.normalize(f.float(), dim=-1)


def conditioned_text_features(model: nn.Module, img_feats: torch.Tensor, classnames: Sequence[str],
                              tokenizer: Callable) -> torch.Tensor:
    """(B, C, E) float32 normalized class text features of each image's prompts (the ``image_prompts`` hook, fed the
    normalized image features ``img_feats`` (B, E)): B*C prompts through the text tower, at most
    ``CONDITIONED_PROMPTS_PER_PASS`` per pass (at least one image's C), so an evaluation batch of many images over
    many classes holds one pass's activations (the features of each (image, class) do not depend on the others)."""
    learner = method_hooks(model)["image_prompts"]
    names = list(classnames)
    per_pass = max(1, CONDITIONED_PROMPTS_PER_PASS // len(names))
    out = [_prompted_text(model, learner, names, tokenizer, image_features=chunk.float())
           for chunk in img_feats.split(per_pass)]
    return torch.cat(out).view(img_feats.shape[0], len(names), -1)


def text_features(model: nn.Module, classnames: Sequence[str], templates: Sequence[str] | str | None = None,
                  tokenizer: Callable | None = None, *, batch_size: int | None = None,
                  use_prompt_learner: bool = True) -> torch.Tensor:
    """(C, E) float32 normalized class text features.

    Templates (strings with ``{}``) are ensembled: features of each prompt are normalized, averaged over the
    templates and renormalized. A model whose method adds a ``prompts`` hook (CoOp) uses its learned prompts and ignores
    ``templates`` (unless ``use_prompt_learner=False``); one with an ``image_prompts`` hook (CoCoOp) gets an
    :class:`ImageConditionedText` for :func:`class_logits`. Gradients flow when the text side has trainable
    parameters. ``batch_size`` chunks the prompts through the text tower (memory; no effect on the result)."""
    classnames = check_classnames(classnames)
    hooks = method_hooks(model) if use_prompt_learner else {}
    if "image_prompts" in hooks:
        return ImageConditionedText(tuple(classnames), tokenizer)
    if "prompts" in hooks:
        return _prompted_text(model, hooks["prompts"], classnames, tokenizer)
    templates = check_templates(templates)
    names = [_clean(c) for c in classnames]
    texts = [t.replace("{}", n) for t in templates for n in names]
    tokens = tokenize(tokenizer, texts)
    f = F.normalize(encode_tokens(model, tokens, batch_size=batch_size).float(), dim=-1)
    if len(templates) == 1:
        return f
    f = f.view(len(templates), len(names), -1).mean(0)
    return F.normalize(f, dim=-1)


@torch.no_grad()
def frozen_text_features(model: nn.Module, classnames: Sequence[str], templates: Sequence[str] | str | None = None,
                         tokenizer: Callable | None = None, *, batch_size: int | None = 256) -> torch.Tensor:
    """Hand-crafted-prompt text features (C, E) under ``torch.no_grad`` (prompt learner ignored): the zero-shot
    classifier and the CLIPFit teacher t^0. Compute it once, before training (it reflects the current weights)."""
    return text_features(model, classnames, templates, tokenizer, batch_size=batch_size,
                         use_prompt_learner=False).detach()


def class_logits(model: nn.Module, img_feats: torch.Tensor, txt_feats: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) float32 logits. Default: ``logit_scale.exp() * img @ txt.T`` (+ logit_bias when the model has one);
    a method's ``logits`` hook (linear probe): the head on ``img_feats`` (``txt_feats`` unused); its
    ``image_logit`` / ``text_logit`` hooks (LLU): each side through its map before the scaled cosine (see
    ``leanclip.registry.HOOK_ROLES``)."""
    hooks = method_hooks(model)
    probe = hooks.get("logits")
    if probe is not None:
        return probe(img_feats.float()).float()
    if txt_feats is None:
        raise ValueError("txt_feats is required (only linear-probe models classify without text features)")
    if isinstance(txt_feats, ImageConditionedText):  # each image's own prompts: logits[b, c] = s * <img_b, t_bc>
        img = F.normalize(img_feats.float(), dim=-1)
        txt = conditioned_text_features(model, img, txt_feats.classnames, txt_feats.tokenizer)
        return _scaled(model, torch.einsum("be,bce->bc", img, txt))
    img, txt = img_feats.float(), txt_feats.float()
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img_feats (B, E) and txt_feats (C, E) must share E, got {tuple(img.shape)} and "
                         f"{tuple(txt.shape)}")
    if "image_logit" in hooks:
        img = hooks["image_logit"](img)
    if "text_logit" in hooks:
        txt = hooks["text_logit"](txt)
    return _scaled(model, img @ txt.t())


def _scaled(model: nn.Module, cos: torch.Tensor) -> torch.Tensor:
    """``logit_scale.exp() * cos`` (+ ``logit_bias`` when the model has one)."""
    logits = model.logit_scale.float().exp() * cos
    if getattr(model, "logit_bias", None) is not None:
        logits = logits + model.logit_bias.float()
    return logits


def clipfit_kd_loss(txt_feats: torch.Tensor, teacher_feats: torch.Tensor, lam: float = 8.0) -> torch.Tensor:
    """CLIPFit knowledge-distillation term ``lam * (1 - mean_k cos(t_k, t0_k))``, computed in float32 (also under
    bf16 autocast)."""
    if txt_feats.shape != teacher_feats.shape or txt_feats.dim() != 2:
        raise ValueError(f"txt_feats and teacher_feats must both be (C, E), got {tuple(txt_feats.shape)} and "
                         f"{tuple(teacher_feats.shape)}")
    with torch.autocast(device_type=txt_feats.device.type, enabled=False):
        t = F.normalize(txt_feats.float(), dim=-1)
        t0 = F.normalize(teacher_feats.float().detach(), dim=-1)
        return float(lam) * (1.0 - (t * t0).sum(-1).mean())
