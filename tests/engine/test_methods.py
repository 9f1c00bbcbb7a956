"""leanclip.prepare: trainable sets and counts (ViT-B-16), registry, options, bad input, heads and features."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanclip import budget, checkpoint, features, heads, lean, methods

CLASSNAMES = ["cat", "dog", "golden_retriever"]


@pytest.fixture(scope="module")
def vitb16(create_model):
    return create_model("ViT-B-16")  # ~3-5 s, built once for the count tests


# ----------------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method,opts,count", [
    ("ln", {}, 65_536),
    ("ln", {"tower": "image"}, 39_936),
    ("ln", {"tower": "text"}, 25_600),
    ("bitfit", {}, 171_008),
    ("clipfit", {}, 46_080),
    ("full", {}, 149_620_737),
    ("llu", {}, 2 * (512 * 512 + 512)),
    ("linear-probe", {"num_classes": 10}, 512 * 10 + 10),
    ("adapter", {}, 2 * 512 * 128),
    ("coop", {"n_ctx": 4}, 4 * 512),
    ("coop", {"n_ctx": 16}, 16 * 512),
    ("ln+coop", {}, 65_536 + 4 * 512),
    ("ln+linear-probe", {"num_classes": 3}, 65_536 + 512 * 3 + 3),
    ("ln+adapter", {}, 65_536 + 2 * 512 * 128),
])
def test_trainable_counts_vit_b16(vitb16, tokenizer, method, opts, count):
    ctx = dict(classnames=CLASSNAMES, tokenizer=tokenizer) if "coop" in method else {}
    methods.prepare(vitb16, method, lean=method != "full", **ctx, **opts)
    assert methods.count_trainable(vitb16) == count
    assert vitb16.leanclip_info["method"] == method


def test_trainable_names_vit_b16(vitb16):
    methods.prepare(vitb16, "clipfit", lean=False)
    names = [n for n, _ in methods.trainable_parameters(vitb16)]
    text = [n for n in names if not n.startswith("visual.")]
    assert text == [f"transformer.resblocks.{i}.mlp.c_proj.bias" for i in range(12)]
    assert all(re.search(r"\.ln_(pre|post|1|2)\.(weight|bias)$", n) for n in names if n.startswith("visual."))
    assert not any("c_proj" in n for n in names if n.startswith("visual."))
    methods.prepare(vitb16, "bitfit", lean=False)
    names = {n for n, _ in methods.trainable_parameters(vitb16)}
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in names
    assert "transformer.resblocks.11.ln_2.bias" in names and "ln_final.bias" in names
    assert "logit_scale" not in names and not any(n.endswith("weight") for n in names)


# ----------------------------------------------------------------------------------------------------------- prepare
def test_prepare_info_and_reprepare(fresh_tiny, tokenizer):
    m = fresh_tiny()
    out = methods.prepare(m, "ln+coop", recompute="mlp", classnames=CLASSNAMES, tokenizer=tokenizer,
                          model_name="leanclip-tiny", n_ctx=4)
    assert out is m
    info = m.leanclip_info
    assert info["method"] == "ln+coop" and info["model_name"] == "leanclip-tiny" and info["version"]
    assert info["options"]["n_ctx"] == 4 and info["options"]["recompute"] == "mlp" and info["options"]["lean"]
    assert info["modules"] == ["prompt_learner"]
    json.dumps(info)
    assert lean.is_lean(m) and m.visual.transformer.resblocks[0].leanclip_recompute == "mlp"
    # re-preparing drops the modules the previous method added and re-freezes everything
    methods.prepare(m, "llu", lean=False)
    assert not hasattr(m, "prompt_learner") and hasattr(m, "llu_image")
    assert not lean.is_lean(m)
    assert {n.split(".")[0] for n, _ in methods.trainable_parameters(m)} == {"llu_image", "llu_text"}


def test_auto_recompute(fresh_tiny):
    """A budget is a step peak: each uniform policy's own predicted peak as the budget gets that policy or one
    with less recompute; below the smallest prediction, a ValueError naming it."""
    m = fresh_tiny()
    methods.prepare(m, "ln", lean=True, classnames=["a", "b"])
    peak = {p: budget.predict_peak(m, 4, p, text_batch_size=2) for p in lean.POLICIES}
    for policy in lean.POLICIES:
        methods.prepare(m, "ln", recompute="auto", memory_budget=peak[policy], batch_size=4, text_batch_size=2,
                        classnames=["a", "b"])
        options = m.leanclip_info["options"]
        assert options["recompute"] == "auto" and options["recompute_requested"] == "auto"
        chosen = options["recompute_plan"]["policies"]["image"]
        assert [b.leanclip_recompute for b in m.visual.transformer.resblocks] == chosen
        plan = budget.plan_recompute(m, peak[policy], 4, text_batch_size=2)
        uniform = budget.RecomputePlan({t: (policy,) * len(p) for t, p in plan.policies.items()})
        assert plan.peak <= peak[policy] and plan.work <= budget.plan_work(m, uniform, 4, text_batch_size=2)
    with pytest.raises(ValueError, match="below the smallest predicted step peak"):
        methods.prepare(m, "ln", recompute="auto", memory_budget=1000, batch_size=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="prefix-tuning"), "unknown method 'prefix-tuning'.*valid methods: .*bitfit.*clipfit"),
    (dict(method="ln+nope"), "unknown method"),
    (dict(method=""), "non-empty"),
    (dict(method="ln+ln"), "repeats"),
    (dict(method="full+ln"), "cannot be combined"),
    (dict(method="ln", foo=1), r"unknown option\(s\) \['foo'\].*valid options"),
    (dict(method="llu", n_ctx=4), r"unknown option\(s\) \['n_ctx'\]"),
    (dict(method="ln", tower="vision"), "tower must be one of"),
    (dict(method="clipfit", tower="image"), "no effect"),
    (dict(method="ln", recompute="all"), "unknown recompute policy 'all'; valid:.*'mlp\\+qkv'"),
    (dict(method="ln", memory_budget=10 ** 9), "only used with recompute='auto'"),
    (dict(method="ln", recompute="auto"), "needs memory_budget"),
    (dict(method="ln", recompute="auto", memory_budget=0, batch_size=2), "memory_budget must be"),
    (dict(method="ln", recompute="auto", memory_budget=-5, batch_size=2), "memory_budget must be"),
    (dict(method="ln", recompute="auto", memory_budget=10 ** 9), "batch_size"),
    (dict(method="ln", lean=False, recompute="mlp"), "needs lean=True"),
    (dict(method="ln", lean="yes"), "lean must be True, False or None"),
    (dict(method="ln", frozen_dtype=torch.int8), "frozen_dtype"),
    (dict(method="ln", lean=False, frozen_dtype=torch.bfloat16), "needs lean=True"),
    (dict(method="coop"), "'coop' needs classnames and tokenizer"),
    (dict(method="coop", classnames=["a"]), "needs tokenizer"),
    (dict(method="linear-probe"), "classnames or num_classes"),
    (dict(method="linear-probe", num_classes=0), r"num_classes must be an int in \[1, "),
    (dict(method="linear-probe", classnames="cat"), "list of strings"),
    (dict(method="llu", beta=2.0), r"beta must be a finite number in \[0, 1\]"),
    (dict(method="adapter", reduction=0), "reduction"),
])
def test_prepare_bad_input(fresh_tiny, kwargs, match):
    m = fresh_tiny()
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        methods.prepare(m, method, **kwargs)


def test_prepare_rejects_unsupported_models():
    with pytest.raises(ValueError, match=r"image tower model.visual and a text tower.*torch.nn.modules.linear.Linear"):
        methods.prepare(nn.Linear(2, 2), "ln")
    with pytest.raises(TypeError):
        methods.prepare("ViT-B-16", "ln")


def test_coop_needs_int_n_ctx(fresh_tiny, tokenizer):
    with pytest.raises(ValueError, match="n_ctx"):
        methods.prepare(fresh_tiny(), "coop", classnames=CLASSNAMES, tokenizer=tokenizer, n_ctx=0)


# ----------------------------------------------------------------------------------------------------------- registry
def test_register_method(fresh_tiny):
    @methods.register_method("test-lastln")
    def _last_ln(model, tower="both", scale=1.0):
        methods.unlock(model, r"^(visual\.ln_post|ln_final)\.", tower)
        return {"test_head": nn.Linear(2, 2)}

    try:
        assert methods.method_options("test-lastln") == {"tower": "both", "scale": 1.0}
        m = fresh_tiny()
        methods.prepare(m, "test-lastln", tower="image", scale=2.0)
        names = {n for n, _ in methods.trainable_parameters(m)}
        assert names == {"visual.ln_post.weight", "visual.ln_post.bias", "test_head.weight", "test_head.bias"}
        with pytest.raises(ValueError, match="unknown option"):
            methods.prepare(m, "test-lastln", bogus=1)
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method("test-lastln", lambda model: {})
        with pytest.raises(ValueError, match="method name"):
            methods.register_method("a+b", lambda model: {})
    finally:
        methods.METHODS.pop("test-lastln", None)


# ----------------------------------------------------------------------------------------------------------- init_from
def test_ln_as_initialization(fresh_tiny, tokenizer, tmp_path):
    src = fresh_tiny()
    methods.prepare(src, "ln")
    with torch.no_grad():
        for _, p in methods.trainable_parameters(src):
            p.add_(torch.randn_like(p))
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors")
    dst = fresh_tiny()
    methods.prepare(dst, "coop", classnames=CLASSNAMES, tokenizer=tokenizer, init_from=path)
    assert torch.equal(dst.visual.ln_pre.weight, src.visual.ln_pre.weight)
    assert torch.equal(dst.ln_final.bias, src.ln_final.bias)
    assert not dst.ln_final.bias.requires_grad  # coop trains only its context
    assert dst.leanclip_info["options"]["init_from"] == str(path)
    # a checkpoint that does not fit is rejected before anything is copied
    other = fresh_tiny()
    methods.prepare(other, "llu")
    bad = checkpoint.save_trainable(other, tmp_path / "llu.safetensors")
    before = fresh_tiny().visual.ln_pre.weight.clone()
    m = fresh_tiny()
    with pytest.raises(ValueError, match="not parameters of the model"):
        methods.prepare(m, "ln", init_from=bad)
    assert torch.equal(m.visual.ln_pre.weight, before)


# ----------------------------------------------------------------------------------------------------------- heads
def test_linear_probe_zero_shot_init(fresh_tiny, tokenizer):
    m = fresh_tiny()
    methods.prepare(m, "linear-probe", classnames=CLASSNAMES, tokenizer=tokenizer)
    img = features.image_features(m, torch.randn(4, 3, 32, 32))
    zs = features.frozen_text_features(m, CLASSNAMES, ["a photo of a {}."], tokenizer)
    ref = m.logit_scale.exp() * img @ zs.t()
    assert torch.allclose(features.class_logits(m, img, None), ref, atol=1e-4)
    m2 = fresh_tiny()
    methods.prepare(m2, "linear-probe", num_classes=5)
    assert m2.linear_probe.fc.weight.abs().sum() == 0


def test_coop_options_are_checked_once(fresh_tiny, tokenizer):
    """prepare runs coop's check (which tokenizes init_text) once; the method then tokenizes it once to start from."""
    seen = []

    def counting(texts):
        seen.append(list(texts))
        return tokenizer(texts)

    methods.prepare(fresh_tiny(), "coop", classnames=CLASSNAMES, tokenizer=counting, n_ctx=4)
    assert seen == [["a photo of a"], ["a photo of a"]]
    for bad in ("dog", [], None):
        with pytest.raises(ValueError, match="classnames"):
            methods.prepare(fresh_tiny(), "coop", classnames=bad, tokenizer=tokenizer)


def test_coop_prompt_learner(fresh_tiny, tokenizer):
    m = fresh_tiny()
    methods.prepare(m, "coop", classnames=CLASSNAMES, tokenizer=tokenizer, n_ctx=4)
    init = m.token_embedding(tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.equal(m.prompt_learner.ctx.data, init.float())
    tok = m.prompt_learner.tokens(CLASSNAMES, tokenizer)
    assert tok[2].argmax() == 1 + 4 + len(tokenizer(["golden retriever."])[0].nonzero()) - 2
    torch.manual_seed(0)
    methods.prepare(m, "coop", classnames=CLASSNAMES, tokenizer=tokenizer, n_ctx=16)
    assert m.prompt_learner.ctx.shape == (16, 64)
    assert 0.015 < m.prompt_learner.ctx.std().item() < 0.025
    # works for class names it was not built with (base-to-new), gradients reach the context only
    txt = features.text_features(m, ["airplane", "bird"], None, tokenizer)
    assert txt.shape == (2, 64) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    txt.sum().backward()
    assert m.prompt_learner.ctx.grad is not None and m.prompt_learner.ctx.grad.abs().sum() > 0
    # the learned prompt path equals encoding the same embeddings by hand through open_clip
    emb, tk = m.prompt_learner(m.token_embedding, ["bird"], tokenizer)
    x = emb + m.positional_embedding
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    ref = F.normalize(x[0, tk[0].argmax()] @ m.text_projection, dim=-1)
    assert torch.allclose(features.text_features(m, ["bird"], None, tokenizer)[0], ref, atol=1e-5)


def test_llu_head():
    torch.manual_seed(0)
    h = heads.LLUHead(8, beta=0.5, gamma=20.0)
    x = F.normalize(torch.randn(5, 8), dim=-1)
    bank = F.normalize(torch.randn(7, 8), dim=-1)
    assert torch.allclose(h(x, bank), x, atol=1e-6)  # identity at init
    assert h.reg().item() == 0.0
    with torch.no_grad():
        h.weight.add_(0.3 * torch.randn(8, 8))
        h.bias.add_(0.1 * torch.randn(8))
    vals = (x @ bank.t()).max(dim=1).values
    alpha = 0.5 * torch.exp(-20.0 * (1 - vals))
    assert torch.allclose(h.alpha(x, bank), alpha, atol=1e-6)
    assert alpha.unique().numel() == 5  # one gate per sample, not one max over the batch
    g = F.normalize(x @ h.weight.t() + h.bias, dim=-1)
    ref = F.normalize(alpha[:, None] * g + (1 - alpha[:, None]) * x, dim=-1)
    assert torch.allclose(h(x, bank), ref, atol=1e-6)
    eye = torch.eye(8)
    assert torch.allclose(h.reg(), ((h.weight - eye) ** 2).sum() / 64 + (h.bias ** 2).sum() / 8)  # authors' mse form
    h.set_bank(bank * 3)
    assert torch.allclose(h(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="bank"):
        heads.LLUHead(8)(x)
    with pytest.raises(ValueError, match="shape"):
        h(x, torch.randn(3, 4))


def test_clip_adapter_and_image_features(fresh_tiny):
    torch.manual_seed(0)
    a = heads.ClipAdapter(16, reduction=4, ratio=0.2)
    x = torch.randn(3, 16)
    assert torch.allclose(a(x), 0.2 * a.fc(x) + 0.8 * x)
    m = fresh_tiny()
    methods.prepare(m, "adapter")
    imgs = torch.randn(2, 3, 32, 32)
    raw = m.encode_image(imgs)
    assert torch.allclose(features.image_features(m, imgs), F.normalize(m.clip_adapter(raw), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        features.image_features(m, imgs[0])


# ----------------------------------------------------------------------------------------------------------- features
def test_text_features_ensemble_and_grads(fresh_tiny, tokenizer):
    m = fresh_tiny()
    methods.prepare(m, "ln")
    temps = ["a photo of a {}.", "art of the {}."]
    f = features.text_features(m, CLASSNAMES, temps, tokenizer)
    per = [F.normalize(m.encode_text(tokenizer([t.replace("{}", c.replace("_", " ")) for c in CLASSNAMES])), dim=-1)
           for t in temps]
    ref = F.normalize(torch.stack(per).mean(0), dim=-1)
    assert torch.allclose(f, ref, atol=1e-5)
    assert f.requires_grad
    frozen = features.frozen_text_features(m, CLASSNAMES, temps, tokenizer)
    assert not frozen.requires_grad and torch.allclose(frozen, f.detach(), atol=1e-6)
    logits = features.class_logits(m, f[:2], f)
    assert torch.allclose(logits, m.logit_scale.exp() * f[:2] @ f.t())
    with pytest.raises(ValueError, match="placeholder"):
        features.text_features(m, CLASSNAMES, ["no placeholder"], tokenizer)
    with pytest.raises(ValueError, match="classnames"):
        features.text_features(m, [], None, tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        features.text_features(m, CLASSNAMES, None, None)


def test_clipfit_kd_loss():
    t = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    t0 = F.normalize(torch.randn(4, 8), dim=-1)
    loss = features.clipfit_kd_loss(t, t0, lam=8.0)
    ref = 8.0 * (1 - F.cosine_similarity(t, t0, dim=-1).mean())
    assert torch.allclose(loss, ref, atol=1e-6)
    assert features.clipfit_kd_loss(t0, t0).abs().item() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = features.clipfit_kd_loss(t.bfloat16(), t0.bfloat16())
    assert lb.dtype == torch.float32
    with pytest.raises(ValueError):
        features.clipfit_kd_loss(t, t0[:3])


# ---------------------------------------------------------------------------------------------------- transactional
def _model_state(model):
    """Everything a failed prepare must leave as it was: tensor values and dtypes (by name), requires_grad, module
    classes and identities, each module's attribute names and plain attribute values, hooks, leanclip_info."""
    plain = (str, int, float, bool, type(None))
    return {
        "tensors": {n: (t.dtype, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()},
        "params": {n: (id(p), p.requires_grad, p.dtype) for n, p in model.named_parameters()},
        "modules": [(n, id(m), type(m), sorted(m.__dict__),
                     {k: v for k, v in m.__dict__.items() if isinstance(v, plain)},
                     len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
        "info": json.dumps(getattr(model, "leanclip_info", None), sort_keys=True),
    }


def _assert_same_state(a, b):
    assert a["params"] == b["params"]
    assert a["modules"] == b["modules"]
    assert a["info"] == b["info"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for n, (dtype, t) in a["tensors"].items():
        assert b["tensors"][n][0] == dtype and torch.equal(b["tensors"][n][1], t), n


@pytest.fixture
def prepared_tiny(fresh_tiny, tokenizer):
    """A lean ln+coop model with bf16 frozen weights and a recompute policy: much for a failed prepare to undo."""
    m = fresh_tiny()
    methods.prepare(m, "ln+coop", classnames=CLASSNAMES, tokenizer=tokenizer, recompute="mlp",
                    frozen_dtype=torch.bfloat16)
    with torch.no_grad():
        m.prompt_learner.ctx.add_(1.0)
        m.ln_final.weight.add_(0.5)
    return m


@pytest.mark.parametrize("method,kw", [
    ("ln+llu", {"beta": 2.0}),                                    # bad option value of a later component
    ("ln+adapter", {"ratio": float("nan")}),
    ("ln+nope", {}),                                              # unknown component
    ("ln+coop", {"tokenizer": "TOKENIZER"}),                      # coop without classnames
    ("ln", {"init_from": "missing.safetensors"}),                 # no such file
    ("ln", {"init_from": "LLU"}),                                 # a checkpoint that does not fit
    ("ln", {"init_from": "TEXT"}),                                # not a safetensors file
    ("ln", {"recompute": "auto", "memory_budget": 1, "batch_size": 4}),  # fails after the method ran
    ("clipfit", {"tower": "image"}),
    ("lilt-adapter", {"reduction": 7}),
    ("ln", {"lean": False, "frozen_dtype": torch.bfloat16}),
])
def test_failed_prepare_leaves_model_unchanged(prepared_tiny, fresh_tiny, tokenizer, tmp_path, method, kw):
    other = fresh_tiny()
    methods.prepare(other, "llu")
    paths = {"LLU": checkpoint.save_trainable(other, tmp_path / "llu.safetensors"),
             "missing.safetensors": tmp_path / "missing.safetensors", "TEXT": tmp_path / "notes.safetensors"}
    paths["TEXT"].write_text("not a checkpoint")
    kw = dict(kw)
    if "init_from" in kw:
        kw["init_from"] = paths[kw["init_from"]]
    if kw.get("tokenizer") == "TOKENIZER":
        kw["tokenizer"] = tokenizer
    for m in (prepared_tiny, fresh_tiny()):
        before = _model_state(m)
        with pytest.raises((ValueError, FileNotFoundError)):
            methods.prepare(m, method, **kw)
        _assert_same_state(before, _model_state(m))


def test_failed_prepare_midway_restores_everything(prepared_tiny, tokenizer):
    """A method that fails after it changed the model (and after earlier components added modules): the model is
    put back exactly, the previous prompt learner, lean classes, bf16 frozen weights and info included."""
    def _breaks(model, tower="both"):
        methods.unlock(model, r"^visual\.", tower)
        model.visual.transformer.resblocks[0].add_module("extra", nn.Linear(2, 2))
        model.visual.ln_post.register_forward_pre_hook(lambda mod, args: None)
        raise RuntimeError("method failed midway")

    methods.register_method("test-breaks", _breaks)
    try:
        before = _model_state(prepared_tiny)
        learner = prepared_tiny.prompt_learner
        with pytest.raises(RuntimeError, match="midway"):
            methods.prepare(prepared_tiny, "ln+linear-probe+test-breaks", num_classes=3)
        _assert_same_state(before, _model_state(prepared_tiny))
        assert prepared_tiny.prompt_learner is learner and lean.is_lean(prepared_tiny)
        assert prepared_tiny.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
        # and it still trains as before
        f = features.text_features(prepared_tiny, CLASSNAMES, None, tokenizer)
        f.sum().backward()
        assert prepared_tiny.prompt_learner.ctx.grad is not None
    finally:
        methods.METHODS.pop("test-breaks", None)


def test_prepare_validates_options_before_changing_anything(fresh_tiny, tokenizer):
    """Bad option values of any component are found by the method checks, before the first component runs."""
    calls = []
    methods.register_method("test-probe", lambda model: calls.append(1) or {})
    try:
        m = fresh_tiny()
        for method, kw in (("test-probe+llu", {"gamma": -1.0}), ("test-probe+coop", {"classnames": ["a"]}),
                           ("test-probe+coop", {"classnames": ["a"], "tokenizer": tokenizer, "std": 0.0}),
                           ("test-probe+linear-probe", {"num_classes": 2, "classnames": CLASSNAMES}),
                           ("test-probe+adapter", {"reduction": 1000})):
            with pytest.raises(ValueError):
                methods.prepare(m, method, **kw)
        assert calls == []
    finally:
        methods.METHODS.pop("test-probe", None)


def test_traits_decide_combinations_trainer_tasks_and_defaults():
    from leanclip.methods import (
        METHOD_TRAITS, check_task, is_closed_set, method_train_defaults, method_trainer, parse_method,
    )

    for combo, needle in (("ln+llu", "frozen towers"), ("llu+bitfit", "frozen towers"), ("full+ln", "everything")):
        with pytest.raises(ValueError, match=needle):
            parse_method(combo)
    assert method_trainer("llu") == "cached" and method_trainer("ln+coop") == "backprop"
    assert method_train_defaults("llu")["batch_size"] == 256 and method_train_defaults("ln") == {}
    assert method_train_defaults("ln+linear-probe")["optimizer"] == "adamw"
    assert is_closed_set("ln+linear-probe") and not is_closed_set("coop")
    check_task("lilt-ln+ln", "contrastive")
    with pytest.raises(ValueError, match="'coop' trains something the contrastive task does not use"):
        check_task("ln+coop", "contrastive")
    assert all(t.trainer in ("backprop", "cached") for t in METHOD_TRAITS.values())


def test_cached_feature_method_cannot_share_a_run(fresh_tiny):
    with pytest.raises(ValueError, match="cannot be combined"):
        methods.prepare(fresh_tiny(), "ln+llu")
