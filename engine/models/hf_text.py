"""The boundary to open_clip's Hugging Face text towers (``open_clip.hf_model.HFTextEncoder``): every ``transformers``
layer internal the engine touches on them, in one module (``models/transformers.py`` is the same for whole
``transformers`` CLIP models).

open_clip builds such a tower from ``text_cfg.hf_model_name`` (``roberta-ViT-B-32``, ``xlm-roberta-base-ViT-B-32``,
``mt5-base-ViT-B-32``, LilT's BERT towers through ``leanclip.configs.register_unaligned_config``): ``text.transformer``
is the ``transformers`` encoder (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``; mT5's ``MT5Stack``), followed
by open_clip's pooler and a fresh ``text.proj``. What lives here:

- which encoder layers the lean engine implements: BERT's post-LN layer as ``BertLayer``, ``RobertaLayer`` and
  ``XLMRobertaLayer`` write it (``layer_obstacle``); a decoder layer, cross-attention or chunked feed-forward is named
  as an obstacle, and so is mT5's ``MT5Block`` (pre-RMSNorm T5 blocks with relative position bias), which keeps
  ``transformers``' own modules;
- the lean layer (``LeanBertLayer``): the same child modules in the same order, frozen projections on
  ``kernels.frozen_linear`` (``LeanLinear``), its LayerNorms on ``kernels.layer_norm`` (``LeanHFLayerNorm``) and the
  recompute policies: ``mlp`` checkpoints ``intermediate`` (dense -> activation), ``mlp+qkv`` also the
  self-attention (q / k / v -> SDPA, keeping the SDPA outputs), ``block`` keeps the layer input only, over chunks
  of ``leanclip_chunk`` samples when set (``leanclip.models.transformers.LeanEncoderLayer._block``: a per-sample
  attention mask is sliced). Exact: the same ops replayed, dropout with its RNG state (over chunks, each chunk draws
  its own masks and its backward replays them);
- the estimates' view of the tower (``tower_geometry``, a ``leanclip.geometry`` reader, and ``estimate_text_bytes``
  for ``leanclip.saved_bytes``): what the post-LN layer keeps for backward under each policy (``layer_units``);
- the sites of the in-layer methods: LoRA's projections (``linear_sites``: q / k / v, the attention output, the MLP's
  two projections, on BERT-style and T5 layers), where Houlsby / Compacter adapters go (``adapter_sites``: the
  dropout after each sub-layer's output projection, before the residual add and the post-LN, as in Houlsby et al.'s
  BERT code), and the appended layer of ``lilt-deep`` (``new_layer_like``).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from leanclip import lean as _lean
from leanclip.geometry import TowerGeometry, elem_size, register_family
from leanclip.models import transformers as _hf
from leanclip.models import transformers_lean as _hf_lean
from leanclip.models.openclip import class_name, custom_tower_blocks, hf_mean_pools, hf_text_tower
from leanclip.recompute import ckpt, frozen

# The BERT-style layer classes, by module. Read from the modules already imported, never imported here: a layer
# exists only once transformers has loaded its module, and importing the modeling code costs every start-up.
_BERT_LAYER_CLASSES = (("transformers.models.bert.modeling_bert", "BertLayer"),
                       ("transformers.models.roberta.modeling_roberta", "RobertaLayer"),
                       ("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaLayer"))

# LoRA targets (leanclip.methods.lora.TARGETS) -> the nn.Linear in a layer
BERT_LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "out": "attention.output.dense", "fc": "intermediate.dense", "proj": "output.dense"}
T5_LINEARS = {"q": "layer.0.SelfAttention.q", "k": "layer.0.SelfAttention.k", "v": "layer.0.SelfAttention.v",
              "out": "layer.0.SelfAttention.o", "fc": "layer.1.DenseReluDense.wi", "proj": "layer.1.DenseReluDense.wo"}
# Houlsby's placement: each sub-layer's output after its projection and dropout, before the residual add
BERT_ADAPTER_SITES = ("attention.output.dropout", "output.dropout")
T5_ADAPTER_SITES = ("layer.0.dropout", "layer.1.dropout")


def is_hf_text(model: nn.Module) -> bool:
    """Whether ``model``'s text tower is open_clip's ``HFTextEncoder``."""
    return hf_text_tower(model) is not None


def split_tower(model: nn.Module, tower: str) -> tuple[str | None, bool]:
    """``tower`` (image / text / both) as (the towers of open_clip / timm blocks, or None; whether it includes a
    Hugging Face text tower)."""
    hf = tower in ("text", "both") and is_hf_text(model)
    if not hf:
        return tower, False
    return ("image" if tower == "both" else None), True


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, encoder layer) of the Hugging Face text tower (empty for other towers)."""
    return custom_tower_blocks(model, "text")


def bert_layers() -> tuple[type, ...]:
    """The BERT-style layer classes whose ``transformers`` modules are loaded."""
    return tuple(getattr(sys.modules[mod], name) for mod, name in _BERT_LAYER_CLASSES if mod in sys.modules)


def is_bert_layer(layer: nn.Module) -> bool:
    return isinstance(layer, bert_layers())


def _is_t5_block(layer: nn.Module) -> bool:
    return type(layer).__name__ in ("T5Block", "MT5Block") and isinstance(getattr(layer, "layer", None),
                                                                          nn.ModuleList)


def layer_obstacle(layer: nn.Module) -> str | None:
    """Why the lean layer cannot run ``layer`` (one phrase naming its class), or None when it can: a BERT-style
    encoder layer (self-attention only, no chunked feed-forward) with ``nn.Linear`` projections and ``nn.LayerNorm``
    s."""
    if not is_bert_layer(layer):
        return class_name(layer)
    if layer.is_decoder or getattr(layer, "add_cross_attention", False):
        return f"{class_name(layer)} as a decoder layer"
    if layer.chunk_size_feed_forward:
        return f"{class_name(layer)} with a chunked feed-forward"
    parts = [layer.get_submodule(s) for s in BERT_LINEARS.values()]
    if not all(isinstance(m, nn.Linear) for m in parts):
        return f"{class_name(layer)} with projections that are not nn.Linear"
    if not all(type(ln) in (nn.LayerNorm, LeanHFLayerNorm) for ln in _layernorms(layer)):
        return f"{class_name(layer)} with LayerNorm {class_name(layer.output.LayerNorm)}"
    return None


def tower_obstacles(model: nn.Module) -> list[str] | None:
    """What keeps the Hugging Face text tower from the lean engine (one line each, empty when every layer is
    covered), or None when the text tower is not a Hugging Face one. ``leanclip.lean.apply_lean`` asks before it
    swaps anything, so the lean classes of the loaded layer classes are registered here."""
    if not is_hf_text(model):
        return None
    _register_layers()
    found = layers(model)
    if not found:
        return [f"text tower {class_name(model.text.transformer)} has no encoder layer list"]
    for i, (_, layer) in enumerate(found):
        why = layer_obstacle(layer)
        if why is not None:
            return [f"text tower layer {i} is {why}"]
    return []


# ----------------------------------------------------------------------------------------------------------- sites
def _linear_table(layer: nn.Module) -> dict | None:
    if is_bert_layer(layer):
        return BERT_LINEARS
    return T5_LINEARS if _is_t5_block(layer) else None


def linear_sites(model: nn.Module, targets) -> list[tuple[str, str, nn.Linear]]:
    """(target, name, ``nn.Linear``) of each LoRA target in every layer of the Hugging Face text tower; ValueError
    naming the layer class where a target has no ``nn.Linear`` (mT5's gated ``fc`` is ``wi_0`` | ``wi_1``)."""
    out = []
    for name, layer in layers(model):
        table = _linear_table(layer)
        if table is None:
            raise ValueError(f"method 'lora' needs the projections of a BERT-style or T5 layer; the text tower layer "
                             f"{name} is {class_name(layer)}")
        for t in targets:
            try:
                m = layer.get_submodule(table[t])
            except AttributeError:
                m = None
            if not isinstance(m, nn.Linear):
                raise ValueError(f"method 'lora': target {t!r} has no single nn.Linear in {class_name(layer)} "
                                 f"({table[t]}); the targets q, k, v, out and proj do")
            out.append((t, f"{name}.{table[t]}", m))
    return out


def adapter_sites(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, width) where Houlsby / Compacter adapters go in the Hugging Face text tower: the dropout after
    each sub-layer's output projection (its output passes the adapter, then the residual add; BERT's post-LN
    follows); ValueError naming the class for another layer."""
    out = []
    for name, layer in layers(model):
        sites = BERT_ADAPTER_SITES if is_bert_layer(layer) else T5_ADAPTER_SITES if _is_t5_block(layer) else None
        if sites is None:
            raise ValueError(f"in-layer adapters need a BERT-style or T5 layer; the text tower layer {name} is "
                             f"{class_name(layer)}")
        width = int(getattr(model.text.config, "hidden_size", None) or model.text.config.d_model)
        out += [(f"{name}.{s}", layer.get_submodule(s), width) for s in sites]
    return out


# ----------------------------------------------------------------------------------------------------------- lilt-deep
def new_layer_like(model: nn.Module, init: str) -> nn.Module:
    """A layer to append to the Hugging Face text tower (``lilt-deep``): a copy of its last layer (``copy``) or one
    initialised as ``transformers`` initialises BERT (``random``: linear weights N(0, initializer_range), biases
    zero, LayerNorms 1 / 0). A post-LN layer ends in LayerNorm(x + sub-layer(x)), which no weights make the identity
    on arbitrary x, so the tower's output changes at the start either way (with ``copy``: the last layer applied
    twice). ValueError naming the class for a layer other than BERT-style."""
    found = layers(model)
    last = found[-1][1] if found else None
    if last is None or not is_bert_layer(last):
        raise ValueError(f"lilt-deep appends a BERT-style encoder layer; the text tower layer is "
                         f"{class_name(last) if last is not None else class_name(model.text.transformer)}")
    new = copy.deepcopy(last)
    if init == "random":
        std = float(getattr(model.text.config, "initializer_range", 0.02))
        for m in new.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return new


def append_layer(model: nn.Module, layer: nn.Module) -> None:
    """Append ``layer`` to the Hugging Face text tower's encoder layer list."""
    name = layers(model)[-1][0].rsplit(".", 1)[0]
    model.get_submodule(name).append(layer)


# ----------------------------------------------------------------------------------------------------------- estimates
def _dropout_units(drops, elem: int, weight: torch.Tensor) -> float:
    """Units (B*L*D*elem) the dropouts ``drops`` keep for backward in training: a mask per element, a bool (1 byte)
    on CUDA (``native_dropout``), elsewhere a scaled noise tensor in the input's dtype (``elem`` bytes). Counted
    whenever ``p > 0``: a training step runs them."""
    live = sum(1 for d in drops if isinstance(d, nn.Dropout) and d.p > 0)
    return live * (1.0 / elem if weight.device.type == "cuda" else 1.0)


def layer_units(layer: nn.Module, policy: str, elem: int, act: str = "gelu") -> float:
    """Activation units (B*L*D) a lean BERT-style layer keeps for backward under ``policy`` when gradients flow
    through all of it (post-LN: each sub-layer ends in LayerNorm(x + dropout(dense(.)))). Frozen projections keep
    no input (``kernels.frozen_linear``). Without recompute: q, k, v and the SDPA output (4), the attention's
    LayerNorm input (1), the activation's input at ratio r = intermediate / hidden (quick-GELU keeps its sigmoid
    too: 2r) and the output LayerNorm's input (1). ``mlp`` checkpoints dense -> activation: its input h replaces the
    r units (7). ``mlp+qkv`` also checkpoints the self-attention, keeping the layer input and the SDPA output for
    q, k, v and SDPA (5). Both LayerNorms and both hidden dropouts sit outside the checkpoints, so their inputs and
    masks stay under every policy but ``block``, which keeps the layer input only (1)."""
    if policy == "block":
        return 1.0
    drop = _dropout_units((layer.attention.output.dropout, layer.output.dropout), elem, layer.output.dense.weight)
    if policy == "mlp+qkv":
        return 5.0 + drop
    if policy == "mlp":
        return 7.0 + drop
    dense = layer.intermediate.dense
    return 6.0 + dense.out_features / dense.in_features * _hf.ACT_KEEPS.get(act, 1.0) + drop


# What each projection reads (q, k and v share the layer input; the output projection reads a view of the SDPA
# output, which every policy but block keeps), and the projections each policy's checkpoints hold
_PROJECTION_INPUT = {"q": "x", "k": "x", "v": "x", "out": "o", "fc": "h", "proj": "g"}
_FREE_INPUTS = ("o",)
_CHECKPOINTED = {"none": (), "mlp": ("fc",), "mlp+qkv": ("q", "k", "v", "fc")}


def _trainable(m: nn.Module | None) -> bool:
    return m is not None and not frozen(m)


def method_units(layer: nn.Module, policy: str, elem: int, width: int, entered: bool = False) -> float:
    """Units a layer's trainable pieces keep on top of ``layer_units``, outside the policy's checkpoints (none under
    ``block``): a trainable projection weight keeps its input, and so does a LoRA pair (``leanclip.lora_linear``)
    without dropout (one input per group of projections reading the same tensor), with dropout the pair's own
    dropout output, and its mask unless its input needs no gradient (``entered``: gradients start in this layer, so
    the layer input does not, nor the attention output when q, k, v hold nothing trainable); a pair keeps its
    rank-sized middle too. An in-layer adapter after a sub-layer's output
    dropout (Houlsby, Compacter: ``h + up(gelu(down(h)))`` in float32) keeps h, the GELU's input and output."""
    if policy == "block":
        return 0.0
    units, inputs = 0.0, {}
    no_grad = ({"x"} | ({"o"} if _entry_units(layer, "none") else set())) if entered else set()
    for key, path in BERT_LINEARS.items():
        m = layer.get_submodule(path)
        if key in _CHECKPOINTED[policy]:
            continue
        lora = getattr(m, "lora", None)
        share = m.weight.requires_grad
        if _trainable(lora):
            units += lora.rank / width
            drop = _dropout_units((lora.dropout,), elem, m.weight)
            mask = 0.0 if _PROJECTION_INPUT[key] in no_grad else drop
            units += (1.0 + mask) * m.in_features / width if drop else 0.0
            share = share or not drop
        if share and _PROJECTION_INPUT[key] not in _FREE_INPUTS:
            inputs[_PROJECTION_INPUT[key]] = m.in_features / width
    units += sum(inputs.values())
    for site in BERT_ADAPTER_SITES:
        for a in layer.get_submodule(site).children():
            if getattr(type(a), "inlayer_adapter", False) and _trainable(a):
                units += (width + 2 * a.down.out_features) * 4 / (width * elem)
    return units


def _entry_units(layer: nn.Module, policy: str) -> float:
    """Units the first layer gradients flow through does not keep when they enter it after its self-attention
    (nothing trainable in q, k, v): q, k, v and the SDPA output. ``mlp+qkv``'s attention checkpoint keeps its input
    and the SDPA outputs either way (what the selective checkpoint caches does not depend on gradients)."""
    if policy in ("block", "mlp+qkv") or any(_trainable(layer.get_submodule(BERT_LINEARS[k])) for k in "qkv"):
        return 0.0
    return 4.0


def tower_geometry(model: nn.Module, tower: str, dtype, text_len) -> TowerGeometry | None:
    """The ``leanclip.geometry`` reader of a Hugging Face text tower of BERT-style layers (None otherwise: mT5's
    blocks keep ``transformers``' modules and have no estimate). Tokens: ``text_len``, else the tower's context
    (``max_position_embeddings``: an upper bound, the tokenizer's context is often shorter, e.g. 77 of RoBERTa's
    514)."""
    if tower != "text" or not is_hf_text(model):
        return None
    found = [layer for _, layer in layers(model)]
    if not found or not all(is_bert_layer(layer) for layer in found):
        return None
    cfg, lead = model.text.config, found[0]
    elem = elem_size(dtype, lead.attention.self.query.weight)
    tokens = int(text_len) if text_len is not None else int(model.text.context_length)
    act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else "gelu"
    return TowerGeometry("text", "hf_text", tuple(found), tokens, cfg.hidden_size, cfg.intermediate_size, False,
                         cfg.num_attention_heads, elem, False, False,
                         {p: layer_units(lead, p, elem, act) for p in ("none", "mlp", "mlp+qkv", "block")})


def _first_grad_layer(model: nn.Module, names: list[str], input_grad: bool) -> int | None:
    """The first layer gradients flow through: 0 when the embeddings train (``input_grad``), else the first layer
    holding a trainable parameter; None when none does."""
    if input_grad:
        return 0
    prefixes = [f"{name}." for name, _ in layers(model)]
    return next((i for i, pre in enumerate(prefixes) if any(n.startswith(pre) for n in names)), None)


def _head_bytes(t: nn.Module, batch: int, rows: int, elem: int) -> int:
    """What open_clip's pooler and projection keep: the mean pooler's int64 mask; the inputs of the projection's
    trainable linears and of its activation (pooled rows only)."""
    total = rows * 8 if hf_mean_pools(t) else 0
    parts = list(t.proj) if isinstance(t.proj, nn.Sequential) else [t.proj]
    width = 0
    for m in parts:
        if isinstance(m, nn.Linear):
            total += batch * m.in_features * elem * int(m.weight.requires_grad)
            width = m.out_features
        elif not any(True for _ in m.parameters()) and not isinstance(m, (nn.Dropout, nn.Identity)):
            total += batch * width * elem  # the activation's input
    return total


def estimate_text_bytes(model: nn.Module, policy: str, batch: int, text_len, dtype) -> int | None:
    """Bytes the Hugging Face text tower keeps for backward under ``policy`` (None: not such a tower with an
    estimate): ``layer_units`` and ``method_units`` per layer from the first one gradients flow through (less
    ``_entry_units`` when they enter it after its attention; an upper bound when they enter further up) with both LayerNorms' statistics and SDPA's logsumexp (none under ``block``); the embeddings'
    LayerNorm input and dropout mask when it trains; the pooler and projection; the fp32-normalized features."""
    g = tower_geometry(model, "text", dtype, text_len)
    if g is None:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")]
    if batch == 0 or not names:
        return 0
    input_grad = any(n.startswith("text.transformer.embeddings.") for n in names)
    first = _first_grad_layer(model, names, input_grad)
    rows, unit = batch * g.tokens, g.unit(batch)
    stats = 0 if policy == "block" else rows * (2 * 8 + g.heads * 4)
    total = 0.0
    for i, layer in enumerate(g.blocks[first:] if first is not None else ()):
        entered = i == 0 and not input_grad  # gradients start inside this layer
        units = g.units[policy] + method_units(layer, policy, g.elem, g.width, entered)
        skipped = _entry_units(layer, policy) if entered else 0.0
        total += (units - skipped) * unit + stats - (rows * g.heads * 4 if skipped else 0)
    emb = model.text.transformer.embeddings
    if any(p.requires_grad for p in emb.LayerNorm.parameters()):
        total += rows * (g.width * g.elem + 8) + _dropout_units((emb.dropout,), g.elem, emb.LayerNorm.weight) * unit
    total += _head_bytes(model.text, batch, rows, g.elem)
    return int(total + batch * (model.text.output_dim * 4 + 8))


# ----------------------------------------------------------------------------------------------------------- lean
class LeanHFLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` of a lean layer through ``kernels.layer_norm`` (same math; output in the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _lean.fused_layer_norm(self, x)
        return super().forward(x) if y is None else y


def _layernorms(layer: nn.Module) -> list[nn.Module]:
    return [layer.attention.output.LayerNorm, layer.output.LayerNorm]


class LeanBertLayer(_hf_lean.LeanEncoderLayer):
    """Mixed into a BERT-style layer by a ``__class__`` swap (names, values and ``transformers``' attention code
    kept; see the module docstring). ``leanclip_after_swap`` moves its projections and LayerNorms to the lean ops;
    ``leanclip.lean.remove_lean`` undoes both."""

    def leanclip_after_swap(self) -> None:
        for path in BERT_LINEARS.values():
            m = self.get_submodule(path)
            if type(m) is nn.Linear:
                m.__class__ = _hf_lean.LeanLinear
        for ln in _layernorms(self):
            if type(ln) is nn.LayerNorm:
                ln.__class__ = LeanHFLayerNorm

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
        policy = self.leanclip_recompute
        grad = torch.is_grad_enabled() and (hidden_states.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))
        rng = self.training  # dropout (hidden, attention, LoRA) replays its mask on recompute
        if grad and policy == "block":  # args: the encoder_hidden_states slot, None for an encoder layer
            return self._block(hidden_states, attention_mask, rng, kwargs)

        def attention(h):
            return self.attention.self(h, attention_mask=attention_mask, **kwargs)[0]

        a = (ckpt(attention, hidden_states, rng=rng, sac=True) if grad and policy == "mlp+qkv"
             else attention(hidden_states))
        h = self.attention.output(a, hidden_states)
        m = ckpt(self.intermediate, h, rng=rng) if grad and policy in ("mlp", "mlp+qkv") else \
            self.intermediate(h)
        return self.output(m, h)


LEAN_LAYERS: dict = {}  # BERT-style layer class -> its lean class (``leanclip_base``: the class it swaps back to)


def _register_layers() -> None:
    """Give ``leanclip.lean`` the lean class of every loaded BERT-style layer class it does not know yet."""
    new = {cls: type(f"Lean{cls.__name__}", (LeanBertLayer, cls), {"leanclip_base": cls})
           for cls in bert_layers() if cls not in LEAN_LAYERS}
    if new:
        LEAN_LAYERS.update(new)
        _lean.register_lean_classes(new)


def _supported(m: nn.Module) -> bool:
    """What ``leanclip.lean.apply_lean`` may swap: a covered BERT-style layer; never a LayerNorm on its own (only a
    lean layer's own, in ``leanclip_after_swap``)."""
    if type(m) is nn.LayerNorm:
        return False
    return layer_obstacle(m) is None if is_bert_layer(m) else True


# a plain nn.LayerNorm is never swapped on its own (``_supported``): the entry lets ``remove_lean`` swap it back
_lean.register_lean_classes({nn.LayerNorm: LeanHFLayerNorm}, supported=_supported, text_tower=tower_obstacles)
register_family(tower_geometry)
