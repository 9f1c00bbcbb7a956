"""ProGrad (Zhu et al., ICCV 2023): CoOp whose cross-entropy gradient is projected off the zero-shot KL gradient
whenever the two conflict.

``prepare(model, "prograd", classnames=..., tokenizer=..., n_ctx=16, init_text="a photo of a", lam=1.0,
temperature=1.0)``: CoOp's learned context (``prompts`` hook; evaluation is CoOp's), trained with a gradient rule
(``MethodTraits.gradient_rule``, applied by the step between the backward and the optimizer step). Each step has two
gradients of the trainable parameters on the same batch:

    g_ce = grad CE(logits, y)
    g_kl = grad T^2 * KL(softmax(z0 / T) || softmax(logits / T))     z0 = logit_scale.exp() * x @ t0^T

t0 being the zero-shot class text features of the hand-written templates (computed once, from the weights the run
starts from) and x the batch's image features. Per parameter tensor (as the authors' code does it):

    g = g_ce - lam * (<g_ce, g_kl> / ||g_kl||^2) * g_kl    if <g_ce, g_kl> < 0,   else g = g_ce

The authors' code (BeierZhu/Prompt-align, trainers/prograd.py and Dassl.ProGrad.pytorch's
``prograd_backward_and_update``) writes the KL term as the cross-entropy to the teacher's soft labels times T^2; it
differs from the KL by the teacher's entropy, a constant, so the gradient is the same. T = 1 (LOSS.T in
configs/trainers/ProGrad/*.yaml), lambda = 1 (0.8 for 8 / 16 shots on Flowers102, DTD and EuroSAT). The context
has 16 vectors whose last ones start from the init text and the others from zero (``check_prompt_options`` with
``align_right``); the authors start from each dataset's template prefix, here one ``init_text`` for every dataset.
The teacher's image features are the model's own (detached): exact while the image tower is frozen (``prograd``
alone, the paper's setting); with a component that trains the image tower (``ln+prograd``) they move with it.

Recipe (``--preset prograd``): CoOp's schedule - SGD lr 0.002, batch 32, cosine, one constant warm-up epoch at
1e-5, 200 / 100 / 50 epochs for 16-8 / 4-2 / 1 shots (configs rn50 / rn50_ep100 / rn50_ep50).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip.features import frozen_text_features
from leanclip.heads import PromptLearner
from leanclip.methods.coop import COOP_RANGES, COOP_STD, CoopOptions, check_prompt_options, prompt_init
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, method_options, register_method

INIT_TEXT = "a photo of a"


def project(g_ce: torch.Tensor, g_kl: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """ProGrad's gradient for one parameter: ``g_ce`` with ``lam`` times its component along ``g_kl`` removed when
    the two point against each other (``<g_ce, g_kl> < 0``), else ``g_ce`` unchanged. Decided on the device (no
    host sync); a zero ``g_kl`` never conflicts."""
    dot = torch.dot(g_ce.reshape(-1), g_kl.reshape(-1))
    norm2 = g_kl.pow(2).sum()
    coef = torch.where(dot < 0, dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny), torch.zeros_like(dot))
    return g_ce - (lam * coef) * g_kl


def kl_to_teacher(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, the batch mean, in float32."""
    t = float(temperature)
    log_p = F.log_softmax(logits.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (t * t)


class ProGradRule:
    """The gradient rule (``MethodTraits.gradient_rule``): ``loss`` is the KL to the zero-shot logits of a
    micro-batch, ``apply`` projects the step's CE gradients off its gradients (:func:`project`)."""

    def __init__(self, teacher_text: torch.Tensor, logit_scale: torch.Tensor, temperature: float, lam: float):
        self.teacher_text, self.logit_scale = teacher_text, logit_scale
        self.temperature, self.lam = float(temperature), float(lam)

    def loss(self, img: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.logit_scale * img.detach().float() @ self.teacher_text.t()
        return kl_to_teacher(logits, teacher, self.temperature)

    def apply(self, grads: list, aux: list) -> list:
        return [g if g is None or a is None else project(g, a.to(g.dtype), self.lam) for g, a in zip(grads, aux)]


def _prograd_rule(ctx):
    """The rule of a run: the zero-shot text features of the run's templates from the weights it starts from."""
    opts = {**method_options("prograd"), **(ctx.model.leanclip_info.get("options") or {})}
    with torch.no_grad(), utils.autocast(ctx.device, ctx.precision):
        teacher = frozen_text_features(ctx.model, ctx.classnames, ctx.templates, ctx.tokenizer).float()
    scale = ctx.model.logit_scale.detach().float().exp()
    return ProGradRule(teacher.to(ctx.device), scale.to(ctx.device), opts["temperature"], opts["lam"])


def _check_prograd(model, classnames=None, tokenizer=None, n_ctx=16, init_text=INIT_TEXT, std=None, **_):
    check_prompt_options(model, "prograd", classnames, tokenizer, n_ctx, init_text, std, align_right=True)


@dataclass(frozen=True)
class ProgradOptions(CoopOptions):
    n_ctx: int = option(16, "learned context vectors", range=COOP_RANGES["n_ctx"])
    init_text: str | None = option(INIT_TEXT, "the text whose token embeddings start the last context vectors "
                                              "(the rest start at zero; empty: random)")
    # lam beyond 1 would turn the conflicting component around instead of removing it
    lam: float = option(1.0, "how much of the conflicting component of the CE gradient is removed",
                        range=OptionRange(float, 0.0, 1.0))
    temperature: float = option(1.0, "the KL's temperature T (the loss is T^2 KL)",
                                range=OptionRange(float, 0.0, 100.0, lo_open=True))


@register_method("prograd", check=_check_prograd, options=ProgradOptions,
                 traits=MethodTraits(tasks=("classify",), hooks={"prompts": "prompt_learner"},
                                     gradient_rule=_prograd_rule))
def _prograd(model, classnames=None, tokenizer=None, n_ctx=16, init_text=INIT_TEXT, std=None, lam=1.0,
             temperature=1.0):
    """CoOp's context whose CE gradient is projected off the zero-shot KL gradient where they conflict (the module
    docstring has the rule). ``init_text`` of at most
    ``n_ctx`` tokens starts the last context vectors (the rest at zero); empty: N(0, std^2) (std default 0.02)."""
    embedding, init = prompt_init(model, tokenizer, n_ctx, init_text)
    learner = PromptLearner(n_ctx, embedding.weight.shape[1], init_embeddings=init,
                            std=COOP_STD if std is None else std)
    learner.classnames = list(classnames)
    return {"prompt_learner": learner.to(embedding.weight.device)}
