"""CoCoOp (Zhou et al., CVPR 2022): CoOp's learned context, shifted per image by a meta-net on the image feature.

``prepare(model, "cocoop", classnames=..., tokenizer=..., n_ctx=4, init_text=None)``: a context ``ctx`` (n_ctx,
width) as CoOp's (``"a photo of a"`` for n_ctx=4, the same init rules and checks) and a meta-net
``pi = Linear(E, E/16) -> ReLU -> Linear(E/16, width)`` on the normalized image feature x (E the joint embedding
width). Image b's prompt for class c is ``[SOS] ctx_1+pi(x_b) .. ctx_n+pi(x_b) <class c> . [EOT]``, so every image
has its own class text features t_bc, and ``logits[b, c] = logit_scale.exp() * <x_b, t_bc>``.

The image feature enters the prompts through the ``image_prompts`` hook (``leanclip.registry.HOOK_ROLES``): the
features path (``leanclip.features.class_logits``) hands the learner each batch's normalized image features and runs
B*C prompts through the text tower; the step, the evaluation and the episodes use that path unchanged. The text tower
runs once per image, as in the authors' code, which is why the recipe trains at batch 1 (``--preset cocoop``).

The authors' recipe (KaiyangZhou/CoOp, configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml): SGD lr 0.002,
batch 1, 10 epochs, cosine, one constant warm-up epoch at 1e-5, n_ctx 4, init "a photo of a", ViT-B/16.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from leanclip.heads import PromptLearner
from leanclip.methods.coop import COOP_STD, CoopOptions, check_prompt_options, prompt_init
from leanclip.registry import MethodTraits, register_method
from leanclip.select import embed_dim, model_device

META_REDUCTION = 16  # the meta-net's bottleneck: E -> E/16 -> width (the authors' code)


class MetaPromptLearner(PromptLearner):
    """CoOp's context plus a meta-net: ``forward(..., image_features=x)`` gives the prompts of every (image, class)
    pair, image-major: ``(embeddings (B*C, L, width), tokens (B*C, L))``."""

    def __init__(self, n_ctx: int, width: int, feature_dim: int, init_embeddings: torch.Tensor | None = None,
                 std: float = 0.02):
        super().__init__(n_ctx, width, init_embeddings=init_embeddings, std=std)
        hidden = max(feature_dim // META_REDUCTION, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(feature_dim, hidden)), ("relu", nn.ReLU()), ("linear2", nn.Linear(hidden, width))]))

    def forward(self, token_embedding: nn.Module, classnames: Sequence[str], tokenizer: Callable,
                max_len: int | None = None, *, image_features: torch.Tensor):
        emb, tok = super().forward(token_embedding, classnames, tokenizer, max_len)  # (C, L, width), context spliced
        b, (c, length, width) = image_features.shape[0], emb.shape
        shift = self.meta_net(image_features.to(self.meta_net[0].weight.dtype))  # (B, width)
        ctx = (self.ctx.unsqueeze(0) + shift.unsqueeze(1)).to(emb.dtype)  # (B, n_ctx, width)
        n = self.n_ctx
        prompts = torch.cat([emb[:, :1].unsqueeze(0).expand(b, c, 1, width),
                             ctx.unsqueeze(1).expand(b, c, n, width),
                             emb[:, 1 + n:].unsqueeze(0).expand(b, c, length - 1 - n, width)], dim=2)
        return prompts.reshape(b * c, length, width), tok.unsqueeze(0).expand(b, c, length).reshape(b * c, length)


def _check_cocoop(model, classnames=None, tokenizer=None, n_ctx=4, init_text=None, std=None, **_):
    check_prompt_options(model, "cocoop", classnames, tokenizer, n_ctx, init_text, std)
    embed_dim(model)


@dataclass(frozen=True)
class CocoopOptions(CoopOptions):
    """CoOp's options; the meta-net's output shifts each of the ``n_ctx`` context vectors per image."""


@register_method("cocoop", check=_check_cocoop, options=CocoopOptions,
                 traits=MethodTraits(tasks=("classify",), hooks={"image_prompts": "prompt_learner"}))
def _cocoop(model, classnames=None, tokenizer=None, n_ctx=4, init_text=None, std=None):
    """CoOp's learned context shifted per image by a meta-net on the image feature; ``n_ctx``, ``init_text`` and
    ``std`` as for ``coop`` (the module docstring has the formula)."""
    embedding, init = prompt_init(model, tokenizer, n_ctx, init_text)
    learner = MetaPromptLearner(n_ctx, embedding.weight.shape[1], embed_dim(model), init_embeddings=init,
                                std=COOP_STD if std is None else std)
    learner.classnames = list(classnames)
    return {"prompt_learner": learner.to(model_device(model))}
