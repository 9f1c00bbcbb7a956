"""One optimizer step of classification fine-tuning: the unit the trainer, the demo and ``leanclip bench step`` run.

    step = ClassifyStep(model, classnames, templates, tokenizer, device=device, precision="fp32")
    step.begin()                                   # the step's class text features: one text-tower forward
    for images, labels in micro_batches:           # CE of each micro-batch, back-propagated with its batch share
        stats = step.micro(images, labels, weight=len(labels) / step_batch)
    terms = step.finish()                          # the method's extra loss terms, then the text tower's backward
    optimizer.step()

    loss = step(images, labels)                    # the same for one micro-batch (returns the step's loss, detached)

The text tower runs forward once per step and backward once per step whatever the number of micro-batches: the
micro-batches back-propagate into a detached copy of the class text features, whose gradient goes through the tower
at ``finish`` (exact, so ``grad_accum=k`` at batch ``b`` is the update of batch ``k*b``). When nothing on the text side
trains (decided from the autograd graph of one forward, not from the method's name) the features are computed once.

Extra loss terms come from the method's declaration (``MethodTraits.loss_terms``, e.g. CLIPFit's distillation to
its zero-shot text features); they are built when the step is, i.e. from the weights the run starts from.

A method's gradient rule (``MethodTraits.gradient_rule``, e.g. ProGrad's projection) adds an auxiliary loss on each
micro-batch whose gradient is kept apart from the training loss's: ``torch.autograd.grad`` of it (weighted like the
CE) into a buffer per trainable parameter, its text-side share through the text tower's graph at ``finish``; then
``finish`` replaces each ``.grad`` with ``rule.apply(grads, aux_grads)`` before the caller's optimizer step
(``apply_rule=False`` defers that, e.g. until the gradients of several processes are summed: :meth:`apply_rule`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from leanclip import utils
from leanclip.features import class_logits, image_features, text_features
from leanclip.registry import method_gradient_rule, method_loss_terms
from leanclip.select import model_device, trainable_parameters

__all__ = ["StepContext", "ClassifyStep"]


@dataclass(frozen=True)
class StepContext:
    """What a method's loss-term factory sees (``MethodTraits.loss_terms``)."""
    model: torch.nn.Module
    classnames: list
    templates: list
    tokenizer: Callable
    cfg: Any
    device: torch.device
    precision: str


class ClassifyStep:
    """Forward and backward of one optimizer step of ``model`` (prepared by ``leanclip.prepare``) on class logits
    against ``classnames`` (see the module docstring). ``cfg``: the run's config, passed to the loss-term factories
    (e.g. ``kd_lambda``). ``compile=True`` runs the image-side forward (features, logits, CE) under
    ``torch.compile``. ``fixed_text=True`` trains the image side alone against class text features computed once
    (no gradient reaches the text side). The optimizer update and zeroing the gradients are the caller's."""

    def __init__(self, model, classnames: Sequence[str], templates: Sequence[str], tokenizer, *, cfg=None,
                 device=None, precision: str = "fp32", compile: bool = False, fixed_text: bool = False):
        info = getattr(model, "leanclip_info", None)
        if not info:
            raise ValueError("model was not prepared: call leanclip.prepare(model, method) first")
        self.model = model
        self.classnames, self.templates, self.tokenizer = list(classnames), list(templates), tokenizer
        self.device = torch.device(device) if device is not None else model_device(model)
        self.precision = precision
        ctx = StepContext(model, self.classnames, self.templates, tokenizer, cfg, self.device, precision)
        self.terms = [t for t in (make(ctx) for make in method_loss_terms(info["method"])) if t is not None]
        make_rule = method_gradient_rule(info["method"])
        self.rule = make_rule(ctx) if make_rule is not None else None
        self.params = [p for _, p in trainable_parameters(model)] if self.rule is not None else []
        self._aux = self._aux_txt = None
        with torch.set_grad_enabled(not fixed_text), utils.autocast(self.device, precision):
            txt0 = self._text()
        self.text_trains = txt0.requires_grad
        self.fixed_txt = None if self.text_trains else txt0.detach()
        del txt0
        self._image_ce = torch.compile(self._image_ce_eager) if compile else self._image_ce_eager
        self._txt_graph = self._txt = None

    def _text(self) -> torch.Tensor:
        return text_features(self.model, self.classnames, self.templates, self.tokenizer)

    def _image_ce_eager(self, images, labels, txt):
        with utils.autocast(self.device, self.precision):
            img = image_features(self.model, images)
            logits = class_logits(self.model, img, txt).float()
        return F.cross_entropy(logits, labels), logits, img

    def begin(self) -> None:
        """Start a step: the class text features it uses (one text-tower forward when the text side trains)."""
        if self.text_trains:
            with utils.autocast(self.device, self.precision):
                self._txt_graph = self._text()
            self._txt = self._txt_graph.detach().requires_grad_()
        else:
            self._txt_graph, self._txt = None, self.fixed_txt
        if self.rule is not None:
            self._aux, self._aux_txt = [torch.zeros_like(p) for p in self.params], None

    def micro(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """CE of one micro-batch, back-propagated scaled by ``weight`` (its share of the step's batch). Returns
        float64 ``[CE * n, correct, n]`` on the device (no host sync)."""
        images = images.to(self.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        ce, logits, img = self._image_ce(images, labels, self._txt)
        if self.rule is not None:
            self._aux_backward(self.rule.loss(img, logits) * weight)
        (ce * weight).backward()
        with torch.no_grad():
            n = labels.numel()
            return torch.stack([ce.detach().double() * n, (logits.argmax(1) == labels).sum().double(),
                                torch.tensor(float(n), dtype=torch.float64, device=self.device)])

    def _aux_backward(self, aux: torch.Tensor) -> None:
        """Add the gradient of the rule's loss ``aux`` to its buffers: the trainable parameters it reaches directly,
        and this step's text-feature leaf (taken through the text tower at ``finish``)."""
        txt_leaf = self._txt_graph is not None
        leaves = self.params + ([self._txt] if txt_leaf else [])
        grads = torch.autograd.grad(aux, leaves, retain_graph=True, allow_unused=True)
        for buf, g in zip(self._aux, grads):
            if g is not None:
                buf.add_(g)
        if txt_leaf and grads[-1] is not None:
            self._aux_txt = grads[-1] if self._aux_txt is None else self._aux_txt + grads[-1]

    def finish(self, term_weight: float = 1.0, apply_rule: bool = True) -> dict[str, torch.Tensor]:
        """End the step: the extra loss terms on this step's text features (back-propagated scaled by
        ``term_weight``: ``1/W`` when W processes each compute them and their gradients are summed), then the text
        tower's backward, then the method's gradient rule unless ``apply_rule=False``. Returns ``{term name:
        detached value}`` (unscaled)."""
        txt, values = self._txt, {}
        for term in self.terms:
            name, value = term(txt)
            if value.requires_grad:
                (value * term_weight if term_weight != 1.0 else value).backward()
            values[name] = value.detach()
        aux_txt = self._aux_txt
        if self._txt_graph is not None and txt.grad is not None:
            self._txt_graph.backward(txt.grad, retain_graph=aux_txt is not None)
        if self._txt_graph is not None and aux_txt is not None:
            grads = torch.autograd.grad(self._txt_graph, self.params, grad_outputs=aux_txt, allow_unused=True)
            for buf, g in zip(self._aux, grads):
                if g is not None:
                    buf.add_(g)
        self._txt_graph = self._txt = self._aux_txt = None
        if apply_rule:
            self.apply_rule()
        return values

    def apply_rule(self, reduce=None) -> None:
        """Replace the trainable parameters' ``.grad`` with what the method's gradient rule makes of them and of
        the auxiliary gradients (a no-op without a rule). ``reduce(tensors)``: sums the auxiliary gradients over
        the processes in place first (their ``.grad`` already summed by the caller)."""
        if self.rule is None or self._aux is None:
            return
        if reduce is not None:
            reduce(self._aux)
        for p, g in zip(self.params, self.rule.apply([p.grad for p in self.params], self._aux)):
            p.grad = g
        self._aux = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A whole step on one batch (gradients accumulated into ``.grad``); returns its loss, detached."""
        self.begin()
        stats = self.micro(images, labels)
        extra = self.finish()
        return stats[0] / stats[2] + sum((v.double() for v in extra.values()), torch.zeros((), dtype=torch.float64,
                                                                                          device=self.device))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step's loss on one batch as one graph (forward only; e.g. to measure what it saves for backward)."""
        txt = self.fixed_txt
        if self.text_trains:
            with utils.autocast(self.device, self.precision):
                txt = self._text()
        ce, _, _ = self._image_ce_eager(images.to(self.device), torch.as_tensor(labels).to(self.device), txt)
        return ce + sum((term(txt)[1] for term in self.terms), torch.zeros((), device=self.device))
