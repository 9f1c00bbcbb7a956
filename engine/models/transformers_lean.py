"""The lean encoder layer of the Hugging Face ``transformers`` family (``leanclip.models.transformers``): CLIP's and
SigLIP's encoder layers swapped by a ``__class__`` change to ``LeanEncoderLayer`` (the recompute policies of
``leanclip.recompute``, frozen projections on ``kernels.frozen_linear`` through ``LeanLinear``), what keeps a tower
from it, and the text tower run at the context cut after the last end-of-text token. ``leanclip.lean`` dispatches
here for a ``transformers:`` model; ``leanclip.models.hf_text`` builds its BERT-style lean layer on these classes."""
from __future__ import annotations

import functools

import torch
from torch import nn

from leanclip.lean_ops import lean_linear
from leanclip.models.transformers import LAYER_CLASSES, TransformersCLIP, tower_layers
from leanclip.recompute import Chunked, ckpt, mask_rows


# ----------------------------------------------------------------------------------------------------------- lean
# CLIP's and SigLIP's encoder layers share one layout: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x)),
# mlp = fc2(activation_fn(fc1(.))). The lean layer runs the same modules in the same order; what it changes is
# what autograd keeps (the recompute policy) and that frozen projections run on kernels.frozen_linear.
_LAYER_CHILDREN = {"self_attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2", "activation_fn")}


class LeanLinear(nn.Linear):
    """A projection of a lean encoder layer: ``leanclip.lean.lean_linear`` (``kernels.frozen_linear`` for a frozen
    weight: its input is not saved, the bias gradient fused; ``F.linear`` for a trainable one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean_linear(x, self.weight, self.bias)


class LeanEncoderLayer(nn.Module):
    """Mixed into a ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` by a ``__class__`` swap (names, values and the
    layer's own attention code kept). Recompute policies, exact (the same ops replayed): ``mlp`` checkpoints
    layer_norm2 -> fc1 -> activation (fc2 outside); ``mlp+qkv`` also layer_norm1 -> attention with a
    selective-checkpoint policy that keeps the SDPA outputs; ``block`` keeps only the layer input."""

    leanclip_recompute = "none"
    leanclip_chunk = None  # samples per chunk under "block" (None: the whole batch at once)

    def _mlp_in(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.activation_fn(self.mlp.fc1(self.layer_norm2(h)))

    def _block(self, hidden_states, attention_mask, rng: bool, kwargs):
        """``block``: the layer's own forward checkpointed, or over chunks of ``leanclip_chunk`` samples
        (``leanclip.recompute.Chunked``: the backward holds one chunk's activations; a per-sample mask is sliced)."""
        base = functools.partial(self.leanclip_base.forward, self, **kwargs)
        batch, chunk = hidden_states.shape[0], self.leanclip_chunk
        if chunk is None or batch <= chunk:
            return ckpt(base, hidden_states, attention_mask, rng=rng)
        trainable = [p for p in self.parameters() if p.requires_grad]
        return Chunked.apply(lambda xc, start, stop: base(xc, mask_rows(attention_mask, start, stop, batch)),
                             None, hidden_states, chunk, rng, *trainable)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        policy = self.leanclip_recompute
        grad = torch.is_grad_enabled() and (hidden_states.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))
        rng = self.training  # dropout (attention, LoRA) replays its mask on recompute
        if grad and policy == "block":
            return self._block(hidden_states, attention_mask, rng, kwargs)

        def attention(h):
            return self.self_attn(hidden_states=self.layer_norm1(h), attention_mask=attention_mask, **kwargs)[0]

        h = hidden_states + (ckpt(attention, hidden_states, rng=rng, sac=True)
                             if grad and policy == "mlp+qkv" else attention(hidden_states))
        m = ckpt(self._mlp_in, h, rng=rng) if grad and policy in ("mlp", "mlp+qkv") else self._mlp_in(h)
        return h + self.mlp.fc2(m)


_LEAN_CLASSES: dict = {}


def _lean_class(cls: type) -> type:
    if cls not in _LEAN_CLASSES:
        _LEAN_CLASSES[cls] = type(f"Lean{cls.__name__}", (LeanEncoderLayer, cls), {"leanclip_base": cls})
    return _LEAN_CLASSES[cls]


def encode_text_truncated(model: TransformersCLIP, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``encode_text`` with the context cut after the last end-of-text token of the batch (exact): CLIP's text
    attention is causal and it reads one token per row, the first end-of-text token (``eos_token_id``; the highest
    id where the config keeps the old ``eos_token_id == 2``, as ``transformers`` does), which the cut keeps with
    everything before it. SigLIP reads the last position of the padded sequence: its context stays whole."""
    tm = model.text.model
    if model.family == "clip" and tokens.dim() == 2 and tokens.numel():
        legacy = tm.eos_token_id == 2
        if legacy or bool((tokens == tm.eos_token_id).any(-1).all()):
            rows = tokens.argmax(-1) if legacy else (tokens == tm.eos_token_id).int().argmax(-1)
            tokens = tokens[:, :int(rows.max()) + 1]
    return model.encode_text(tokens, normalize=normalize)


def lean_obstacles(model: TransformersCLIP) -> list[str]:
    """What keeps the lean encoder layer from a tower: a layer class or layout it does not know, one line each."""
    out = []
    for name, layer in tower_layers(model, "both"):
        base = getattr(type(layer), "leanclip_base", type(layer))
        ok = base.__name__ in LAYER_CLASSES and all(
            hasattr(getattr(layer, part, None), c) for part, cs in _LAYER_CHILDREN.items() for c in cs)
        if not ok:
            out.append(f"{name}: {base.__module__}.{base.__qualname__} (not a CLIP / SigLIP encoder layer)")
    return out


def apply_lean(model: TransformersCLIP, policy: str, chunk=None) -> None:
    """Swap every encoder layer to its lean class with ``policy`` (and, for ``block``, ``chunk`` samples per
    chunk), and its plain ``nn.Linear`` projections to :class:`LeanLinear` (LoRA's projections keep their own
    class)."""
    for _, layer in tower_layers(model, "both"):
        if not isinstance(layer, LeanEncoderLayer):
            layer.__class__ = _lean_class(type(layer))
        layer.leanclip_recompute = policy
        layer.leanclip_chunk = chunk
        for part, children in _LAYER_CHILDREN.items():
            for c in children:
                m = getattr(getattr(layer, part), c)
                if type(m) is nn.Linear:
                    m.__class__ = LeanLinear


def remove_lean(model: nn.Module) -> None:
    """Undo :func:`apply_lean` anywhere in ``model`` (a no-op where it was not applied)."""
    for m in model.modules():
        if isinstance(m, LeanEncoderLayer):
            m.__dict__.pop("leanclip_recompute", None)
            m.__dict__.pop("leanclip_chunk", None)
            m.__class__ = m.leanclip_base
        elif type(m) is LeanLinear:
            m.__class__ = nn.Linear


def set_recompute(model: nn.Module, policy: str, chunk: int | None = None) -> None:
    for m in model.modules():
        if isinstance(m, LeanEncoderLayer):
            m.leanclip_recompute = policy
            m.leanclip_chunk = chunk


def is_lean(model: nn.Module) -> bool:
    return any(isinstance(m, LeanEncoderLayer) for m in model.modules())
