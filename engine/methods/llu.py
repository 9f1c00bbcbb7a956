"""``llu`` (LLU): frozen encoders and two identity-initialised affine maps on the embeddings, gated by the
similarity to the training features. This module registers the method and builds its maps; the cached-feature
training loop is ``leanclip.llu``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from leanclip import heads as _heads
from leanclip.heads import LLU_BLENDS, LLU_GATES, LLU_INITS, LLU_REGS
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import embed_dim


def _check_llu(model, beta=0.5, gamma=20.0, gate="exp", threshold=0.1, init="identity", reg="mse", shared=False,
               init_seed=0, blend="normalized", **_):
    _heads.check_llu_options(beta, gamma, gate, threshold, init, reg, init_seed, blend)
    if not isinstance(shared, bool):
        raise ValueError(f"shared must be true or false, got {shared!r}")
    embed_dim(model)


@dataclass(frozen=True)
class LluOptions:
    beta: float = option(0.5, "the gate's scale: how much of the mapped feature is mixed in",
                         range=OptionRange(float, 0.0, 1.0))
    gamma: float = option(20.0, "the gate's sharpness in the distance to the nearest training feature",
                          range=OptionRange(float, 0.0, _heads.LLU_GAMMA_MAX))  # see heads.LLU_GAMMA_MAX
    gate: Literal[LLU_GATES] = option("exp", "exp: the paper's gate; dirac: 1 within threshold; none: always 1")
    threshold: float = option(0.1, "the dirac gate's cosine distance", range=OptionRange(float, 0.0, 2.0))
    init: Literal[LLU_INITS] = option("identity", "start the maps at the identity or at random (init_seed)")
    reg: Literal[LLU_REGS] = option("mse", "mse: the authors' code; norm: the paper's ||W - I|| + ||b||")
    shared: bool = option(False, "one map for both towers")
    init_seed: int = option(0, "the seed of init=random", range=OptionRange(int, 0, 2 ** 32 - 1))  # as --seed
    blend: Literal[LLU_BLENDS] = option("normalized", "normalized: blend normalize(g(x)) with x; paper: eq. 4, g(x) "
                                                      "itself")
    # read by the cached-feature trainer (leanclip.llu.train_llu), not by the maps; --llu-lambda / --llu-clusters set
    # them. The regulariser is a mean of squares (or a norm) of order 1 at most; the clusters never exceed the
    # training features, so their bound only keeps the value an int sklearn takes
    llu_lambda: float = option(1e3, "weight of the regulariser pulling the maps towards the identity (the authors' "
                                    "1000)", range=OptionRange(float, 0.0, 1e9))
    llu_clusters: int | None = option(512, "the image bank: at most this many agglomerative cluster centres of the "
                                           "training features (0 or none: all of them)",
                                      range=OptionRange(int, 0, 2 ** 31 - 1))


@register_method("llu", check=_check_llu, options=LluOptions, traits=MethodTraits(
    trainer="cached", tasks=("classify",), alone=True, hooks={"image_logit": "llu_image", "text_logit": "llu_text"},
    train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 256, "warmup_epochs": 0}))
def _llu(model, beta=0.5, gamma=20.0, gate="exp", threshold=0.1, init="identity", reg="mse", shared=False,
         init_seed=0, blend="normalized", llu_lambda=1e3, llu_clusters=512):
    """Encoders frozen; identity-initialised affine maps on the image and text embeddings (``heads.LLUHead``).
    Ablations (``heads.LLUHead``): ``gate`` exp | dirac (alpha = 1 iff cosine distance <= ``threshold``) | none;
    ``init`` identity | random (seeded by ``init_seed``); ``shared``: one map for both towers (g_I = g_T);
    ``reg`` mse (the authors' code, default) | norm (the paper's ||W - I|| + ||b||); ``blend`` normalized (default)
    | paper (eq. 4: g(x) blended without normalizing it first). ``llu_lambda`` (the regulariser's weight) and
    ``llu_clusters`` (the image bank's size) are the trainer's (``leanclip.llu.train_llu``)."""
    e = embed_dim(model)
    g = torch.Generator().manual_seed(init_seed)
    kw = dict(gate=gate, threshold=threshold, init=init, reg=reg, blend=blend, generator=g)
    img = _heads.LLUHead(e, beta, gamma, **kw)
    txt = _heads.LLUHead(e, beta, gamma, **kw)
    return {"llu_image": img, "llu_text": txt.tie_to(img) if shared else txt}
