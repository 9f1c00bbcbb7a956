"""``linear-probe``: a linear head on the normalized image features, initialised at the zero-shot classifier when
classnames and a tokenizer are given (closed-set: it classifies only its training classes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leanclip import heads as _heads
from leanclip.features import frozen_text_features
from leanclip.methods._options import context_option
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import embed_dim, model_device


def _probe_classes(classnames, num_classes) -> int:
    """The number of classes of a linear probe: len(classnames) (num_classes must agree) or num_classes."""
    if classnames is not None:
        classnames = list(classnames)
        if not classnames:
            raise ValueError("classnames must not be empty")
        if num_classes is not None and num_classes != len(classnames):
            raise ValueError(f"num_classes={num_classes} but {len(classnames)} classnames were given")
        c = len(classnames)
    elif num_classes is not None:
        c = num_classes
    else:
        raise ValueError("method 'linear-probe' needs classnames or num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"num_classes must be a positive int, got {c!r}")
    return c


def _check_linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None, **_):
    from leanclip.features import check_templates

    _probe_classes(classnames, num_classes)
    check_templates(templates or ["a photo of a {}."])
    embed_dim(model)


@dataclass(frozen=True)
class LinearProbeOptions:
    classnames: Any = context_option("classnames", "the classes: the head's size and its zero-shot start")
    tokenizer: Any = context_option("tokenizer", "encodes the class prompts of the zero-shot start")
    num_classes: int | None = option(None, "the head's size without classnames (a zero start)",
                                     range=OptionRange(int, 1, 10 ** 6))
    templates: Any = context_option("templates", "the prompts of the zero-shot start")


@register_method("linear-probe", check=_check_linear_probe, options=LinearProbeOptions,
                 traits=MethodTraits(tasks=("classify",), closed_set=True, hooks={"logits": "linear_probe"},
                                     train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                                     "warmup_epochs": 0}))
def _linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None):
    """Linear head E -> C on normalized image features, initialised from the zero-shot class text weights
    (``logit_scale.exp() * text_features``, and a SigLIP model's ``logit_bias`` as its bias, so it starts at the
    zero-shot logits) when classnames and tokenizer are given, else zeros. C = len(classnames) or ``num_classes``."""
    c = _probe_classes(classnames, num_classes)
    weight = None
    if classnames is not None and tokenizer is not None:
        zs = frozen_text_features(model, list(classnames), templates or ["a photo of a {}."], tokenizer)
        weight = (model.logit_scale.detach().float().exp() * zs.float()).cpu()
    head = _heads.LinearProbe(embed_dim(model), c, weight=weight)
    bias = getattr(model, "logit_bias", None)
    if weight is not None and isinstance(bias, torch.Tensor):  # SigLIP's logits: scale * cos + logit_bias
        with torch.no_grad():
            head.fc.bias.fill_(float(bias))
    dev = model_device(model)
    return {"linear_probe": head.to(dev)}
