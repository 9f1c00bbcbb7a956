"""Per-episode adaptation: Kim & Pathak's Mini-ImageNet rows "Prompt Tuning + LN", "Adapter + LN" and "Linear Probe +
LN". For each N-way K-shot episode a fresh method is prepared on the model's weights (the LN-tuned checkpoint),
trained on the episode's N*K support images and scored on its queries.

    cfg = adapt_config("coop", steps=50)
    logits = adapt_episode(model, "coop", support, y_support, query, names, templates, tok, cfg, seed=s,
                           device=dev, precision="fp32")          # (Q, N) query logits

``support`` / ``query`` are the bare image encoder's output (``leanclip.features.encode_images``, what
``leanclip.feature_cache`` stores), not images: the three methods train modules that sit after a frozen image encoder
(CoOp's prompt context on the text side, CLIP-Adapter and the linear probe on the image features), so every image is
encoded once for all episodes, and each step applies the new method's feature hook to those rows
(``leanclip.features.features_from_encoded``) exactly as it would to a fresh batch. CoOp's context back-propagates
through the text tower, so its N class prompts run every step; the adapter gets its class text features once per
episode (decided from the autograd graph of one forward, as ``leanclip.step`` decides), and the probe, a head on the
image features (initialised from the episode's zero-shot text weights by ``prepare``), needs none.

Fresh per episode: ``leanclip.prepare`` drops the previous episode's module, freezes every parameter (the
checkpoint's tuned LayerNorms included: the "+ LN" rows start from them and keep them) and adds a new module after
seeding every RNG with ``seed`` (CLIP-Adapter's random layers), so an episode's numbers depend on its seed alone.

Recipe: the method's own optimisation defaults, as ``leanclip train`` applies them (``leanclip.trainer.TrainConfig``
updated by the method's ``train_defaults``): ``coop`` and ``adapter`` SGD (momentum 0.9) at 2e-3, weight decay 5e-4,
one constant warm-up step at 1e-5, then cosine (CoOp's recipe); ``linear-probe`` AdamW at 1e-3, no weight decay, no
warm-up. Every step is one full batch of the support set (CoOp's batch of 32 holds a 5-way support set whole, so a
step is one CoOp epoch).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip.features import class_logits, features_from_encoded, text_features
from leanclip.methods import method_hooks, method_options, method_train_defaults, prepare  # registered on import
from leanclip.registry import METHOD_CHECKS
from leanclip.select import trainable_parameters
from leanclip.training import build_optimizer, lr_at, set_lr

__all__ = ["ADAPT_METHODS", "check_adapt_method", "check_adapt_model", "adapt_config", "adapt_episode"]

# methods that train only modules after a frozen image encoder: images encoded once serve every episode
ADAPT_METHODS = ("coop", "adapter", "linear-probe")


def check_adapt_method(method, flag: str = "adapt method") -> str:
    """``method`` when it is one of :data:`ADAPT_METHODS`, else a ValueError naming ``flag``."""
    if method not in ADAPT_METHODS:
        raise ValueError(f"{flag} must be one of {', '.join(ADAPT_METHODS)} (the methods trained after a frozen "
                         f"image encoder), got {method!r}")
    return method


def check_adapt_model(model, method: str, classnames, templates, tokenizer) -> None:
    """The method's own check (``leanclip.registry``: its towers, its options) on ``model`` with one episode's
    ``classnames``, as ``prepare`` runs it, without changing the model: a method the model cannot take (CoOp on a
    tower without token embeddings) is refused before any image is encoded."""
    check_adapt_method(method)
    check = METHOD_CHECKS.get(method)
    if check is None:
        return
    given = {"classnames": list(classnames), "tokenizer": tokenizer, "templates": list(templates)}
    options = method_options(method)
    check(model, **{**options, **{k: v for k, v in given.items() if k in options}})


def adapt_config(method: str, steps: int, lr: float | None = None):
    """The ``TrainConfig`` of one episode's training: the method's ``train_defaults`` over the trainer's defaults,
    ``steps`` full-batch optimizer steps (its ``epochs``, one step each), ``lr`` when given. ValueError naming the
    field out of range."""
    from leanclip.trainer import TrainConfig

    check_adapt_method(method)
    defaults = {k: v for k, v in method_train_defaults(method).items() if k != "batch_size"}
    cfg = dataclasses.replace(TrainConfig(), **{**defaults, "method": method, "epochs": steps})
    if lr is not None:
        cfg.lr = lr
    return cfg.validate()


def _prepare_fresh(model, method: str, classnames: list[str], templates, tokenizer, seed: int) -> None:
    utils.seed_everything(seed)
    info = getattr(model, "leanclip_info", None) or {}
    lean = (info.get("options") or {}).get("lean")  # keep the tower modules the model already runs
    extra = {"templates": list(templates)} if "templates" in method_options(method) else {}
    prepare(model, method, classnames=classnames, tokenizer=tokenizer, lean=lean, **extra)


def adapt_episode(model, method: str, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                  classnames, templates, tokenizer, cfg, *, seed: int, device, precision: str) -> torch.Tensor:
    """(Q, N) float32 logits of ``query`` after training a fresh ``method`` on ``support`` (module docstring).
    ``support`` (S, E) / ``query`` (Q, E): encoder outputs; ``support_labels`` (S,) in [0, N); ``classnames``: the
    episode's N class names in label order; ``cfg``: :func:`adapt_config`. ``model`` is left prepared with the
    episode's method. A non-finite loss is a ``leanclip.utils.NonFiniteLossError`` naming the step."""
    check_adapt_method(method)
    classnames = list(classnames)
    _prepare_fresh(model, method, classnames, templates, tokenizer, seed)
    model.to(device)
    opt = build_optimizer([p for _, p in trainable_parameters(model)], cfg)
    x, y = support.to(device), torch.as_tensor(support_labels).long().to(device)
    model.train()
    probe = method_hooks(model).get("logits") is not None  # a head on the image features: no text needed
    with utils.autocast(device, precision):
        txt = None if probe else text_features(model, classnames, templates, tokenizer)
    text_trains = txt is not None and txt.requires_grad
    for step in range(cfg.epochs):
        set_lr(opt, lr_at(step, cfg, 1))
        opt.zero_grad(set_to_none=True)
        with utils.autocast(device, precision):
            if text_trains and step:  # the context moved: the class prompts through the text tower again
                txt = text_features(model, classnames, templates, tokenizer)
            loss = F.cross_entropy(class_logits(model, features_from_encoded(model, x), txt).float(), y)
        if not torch.isfinite(loss):
            raise utils.NonFiniteLossError(f"adapting {method} to an episode (seed {seed}): non-finite loss at step "
                                           f"{step + 1}; lower the learning rate")
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), utils.autocast(device, precision):
        if text_trains:
            txt = text_features(model, classnames, templates, tokenizer)
        return class_logits(model, features_from_encoded(model, query.to(device)), txt).float()
