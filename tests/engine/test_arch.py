"""Towers the lean modules do not cover: ModifiedResNet (a tiny RN config), a timm tower (a test double of
open_clip's TimmModel: timm is not a dependency) and a Hugging Face-style text tower. prepare keeps such a tower's modules with
a one-line notice naming the tower class, every method that is defined on the towers trains the right parameters
with exact gradients, and a method that is not defined there is a ValueError naming the class."""
import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from leanclip import lean, methods
from leanclip.configs import create_random_model, register_tiny_config
from tests.engine.peft_checks import clip_loss, prepare_with_notices

CLASSNAMES = ["cat", "dog"]


class _TimmTrunk(nn.Module):
    """A ViT-ish timm trunk in miniature: patch conv, LayerNorm, an MLP, mean pooling (timm's LayerNorm is an
    nn.LayerNorm subclass too)."""

    def __init__(self, width=32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, 8, 8)
        self.norm_pre = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        x = self.norm_pre(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.norm(x).mean(1)


class TinyTimmModel(TimmModel):
    """open_clip's TimmModel (its class, forward and head layout) around a small trunk built without timm."""

    def __init__(self, embed_dim, width=32):
        nn.Module.__init__(self)
        self.image_size = (32, 32)
        self.trunk = _TimmTrunk(width)
        self.head = nn.Sequential(OrderedDict(proj=nn.Linear(width, embed_dim, bias=False)))


class HFTextEncoder(nn.Module):
    """Stands in for open_clip's Hugging Face text tower (``model.text`` of a CustomTextCLIP)."""

    def __init__(self, output_dim, width=32):
        super().__init__()
        self.output_dim = output_dim
        self.embed = nn.Embedding(49408, width)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, output_dim, bias=False)

    def forward(self, tokens):
        return self.proj(self.ln(self.embed(tokens)).mean(1))


@pytest.fixture(scope="module")
def rn_base():
    name = register_tiny_config("leanclip-tiny-rn", vision_cfg={"layers": [1, 1, 1, 1], "width": 16,
                                                                 "patch_size": None, "head_width": 16})
    m = create_random_model(name, seed=0)
    with torch.no_grad():  # zero-initialised bn3 weights would zero the residual branches' gradients
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return m


@pytest.fixture(scope="module")
def timm_base(tiny_base):
    m = copy.deepcopy(tiny_base)
    torch.manual_seed(1)
    m.visual = TinyTimmModel(64)
    return m


@pytest.fixture(scope="module")
def hf_base(tiny_name):
    m = create_random_model(tiny_name, seed=0, force_custom_text=True)
    torch.manual_seed(2)
    m.text = HFTextEncoder(64)
    return m


def _check_grads(base, prepared, tok):
    """Gradients of the prepared model's trainable parameters equal plain autograd on an unprepared copy in which
    every parameter requires grad; frozen parameters get none."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    tokens = tok(["a cat", "a dog on grass", "a bird"])
    ref = copy.deepcopy(base).eval()
    ref.requires_grad_(True)
    clip_loss(ref, images, tokens).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    prepared.eval()
    clip_loss(prepared, images, tokens).backward()
    trainable = 0
    for n, p in prepared.named_parameters():
        if p.requires_grad:
            trainable += 1
            assert p.grad is not None, n
            ref_g = ref_grads[n]  # fp32 rounding apart (conv backward algorithms differ with what needs grad)
            assert (p.grad - ref_g).norm() <= 1e-4 * ref_g.norm() + 1e-7, n  # k_proj.bias: exactly 0
        else:
            assert p.grad is None, n
    assert trainable > 0


# ----------------------------------------------------------------------------------------------------------- RN
@pytest.mark.parametrize("method", ["ln", "bitfit", "full"])
def test_modified_resnet_methods(rn_base, tok, method):
    m = copy.deepcopy(rn_base)
    notes = prepare_with_notices(m, method)
    # the image tower keeps its own modules, named in one line; the text tower still goes lean
    assert any("open_clip.modified_resnet.ModifiedResNet" in s and "keeps its own modules" in s for s in notes), notes
    assert all(len(s.splitlines()) == 1 for s in notes)
    assert m.leanclip_info["options"].get("lean_towers") == ["text"]
    assert not any(isinstance(b, lean.LeanBlockMixin) for b in m.visual.modules())
    assert any(isinstance(b, lean.LeanBlockMixin) for b in m.transformer.modules())
    names = {n for n, _ in methods.trainable_parameters(m)}
    if method == "ln":  # ModifiedResNet has no LayerNorm: the text tower's are trained, and a notice says so
        assert names and all(not n.startswith("visual.") for n in names)
        assert any("image tower open_clip.modified_resnet.ModifiedResNet has no LayerNorms" in s for s in notes)
    elif method == "bitfit":  # BatchNorm and attention-pool biases
        assert "visual.bn1.bias" in names and "visual.attnpool.c_proj.bias" in names
        assert "visual.attnpool.c_proj.weight" not in names and "transformer.resblocks.0.attn.in_proj_bias" in names
    else:
        assert names == {n for n, _ in m.named_parameters()}
    _check_grads(rn_base, m, tok)


@pytest.mark.parametrize("method,kw", [("llu", {}), ("adapter", {}), ("linear-probe", {"num_classes": 3}),
                                       ("coop", {"classnames": CLASSNAMES}), ("ln+coop", {"classnames": CLASSNAMES}),
                                       ("lit", {})])
def test_modified_resnet_other_methodsprepare_with_notices(rn_base, tok, method, kw):
    m = copy.deepcopy(rn_base)
    extra = {"tokenizer": tok} if "coop" in method else {}
    prepare_with_notices(m, method, **extra, **kw)
    assert m.leanclip_info["method"] == method and methods.count_trainable(m) > 0


@pytest.mark.parametrize("method,kw,match", [
    ("clipfit", {}, "image tower open_clip.modified_resnet.ModifiedResNet has none"),
    ("ln", {"tower": "image"}, "image tower open_clip.modified_resnet.ModifiedResNet has none"),
    ("ln", {"lean": True}, "lean=True.*image tower open_clip.modified_resnet.ModifiedResNet"),
    ("ln", {"frozen_dtype": torch.bfloat16}, "frozen_dtype needs the lean modules.*ModifiedResNet"),
    ("lilt-adapter", {}, "needs an open_clip VisionTransformer.*ModifiedResNet"),
    ("lilt-ln", {}, "needs an open_clip VisionTransformer.*ModifiedResNet"),
])
def test_modified_resnet_undefined_methods_name_the_tower(rn_base, method, kw, match):
    m = copy.deepcopy(rn_base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice before a rejected call
        with pytest.raises(ValueError, match=match):
            methods.prepare(m, method, **kw)
    assert not hasattr(m, "leanclip_info") and methods.count_trainable(m) == methods.count_trainable(rn_base)


def test_modified_resnet_lilt_ln_without_projections_on_text(rn_base):
    m = copy.deepcopy(rn_base)
    prepare_with_notices(m, "lilt-ln", tower="text")
    assert all(not n.startswith("visual.") for n, _ in methods.trainable_parameters(m))


# ----------------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("method", ["ln", "bitfit", "full"])
def test_timm_tower_methods(timm_base, tok, method):
    m = copy.deepcopy(timm_base)
    notes = prepare_with_notices(m, method)
    assert any("TinyTimmModel" in s and "keeps its own modules" in s for s in notes), notes  # the text tower: lean
    names = {n for n, _ in methods.trainable_parameters(m)}
    if method == "ln":
        assert {"visual.trunk.norm.weight", "visual.trunk.norm_pre.bias", "ln_final.weight"} <= names
    _check_grads(timm_base, m, tok)


def test_timm_tower_clipfit_and_coop(timm_base, tok):
    m = copy.deepcopy(timm_base)
    prepare_with_notices(m, "clipfit")
    names = {n for n, _ in methods.trainable_parameters(m)}
    assert "visual.trunk.norm.bias" in names and "transformer.resblocks.1.mlp.c_proj.bias" in names
    prepare_with_notices(m, "ln+coop", classnames=CLASSNAMES, tokenizer=tok)
    assert m.prompt_learner.ctx.requires_grad and m.visual.trunk.norm.weight.requires_grad
    assert methods.embed_dim(m) == 64  # from the text projection: TimmModel has no output_dim
    with pytest.raises(ValueError, match="lean=True.*TinyTimmModel"):
        methods.prepare(m, "ln", lean=True)


# ----------------------------------------------------------------------------------------------------------- HF text
def test_hf_text_tower(hf_base, tok):
    m = copy.deepcopy(hf_base)
    notes = prepare_with_notices(m, "ln")
    assert any("text tower" in s and "HFTextEncoder" in s for s in notes), notes
    assert "text.ln.weight" in {n for n, _ in methods.trainable_parameters(m)}
    _check_grads(hf_base, m, tok)
    for method, kw in (("coop", {"classnames": CLASSNAMES, "tokenizer": tok}), ("clipfit", {})):
        with pytest.raises(ValueError, match="text tower .*HFTextEncoder"):
            methods.prepare(m, method, **kw)
    assert m.leanclip_info["method"] == "ln"


# ----------------------------------------------------------------------------------------------------------- blocks
def test_custom_block_type_is_named(tok):
    """open_clip's CustomResidualAttentionBlock (block_type='custom', qk_norm, scaled cosine attention...) uses
    open_clip's own Attention, not nn.MultiheadAttention: lean=True names it, automatic lean keeps that tower's
    modules."""
    name = register_tiny_config("leanclip-tiny-custom-block", vision_cfg={"block_type": "custom"})
    m = create_random_model(name)
    with pytest.raises(ValueError, match="CustomResidualAttentionBlock with attn open_clip.transformer.Attention"):
        methods.prepare(m, "ln", lean=True)
    with pytest.raises(ValueError, match="CustomResidualAttentionBlock"):
        lean.apply_lean(m)
    assert not any(type(x).__name__.startswith("Lean") for x in m.modules())
    base = copy.deepcopy(m)
    notes = prepare_with_notices(m, "ln")
    assert any("CustomResidualAttentionBlock" in s for s in notes)
    assert not any(isinstance(b, lean.LeanBlockMixin) for b in m.visual.modules())  # the text tower goes lean
    _check_grads(base, m, tok)
