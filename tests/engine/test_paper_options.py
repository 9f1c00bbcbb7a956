"""The papers' variants from the command line: LN-tuned weights as initialisation (--init-from, recorded and
re-applied by eval), CLIPFit's parameter-group ablations and L2 regulariser, and its prompt-template set."""
import copy
import json

import open_clip
import pytest
import torch

from leanclip import cli, kernels, utils
from leanclip.methods import count_trainable, prepare
from leanclip.step import ClassifyStep
from leanclip.templates import CLIPFIT_TEMPLATES, DATASET_TEMPLATES, get_templates
from leanclip.trainer import TrainConfig
from tests.engine.cli_checks import last_json, run


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


def common(synth_dir, weights):
    return ["--pretrained", weights, "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress",
            "--threads", 1, "--shots", 4, "--batch-size", 8, "--optimizer", "adamw", "--lr", 0.01]


# ------------------------------------------------------------------------------------------------ LN as initialisation
def test_init_from_is_recorded_and_reapplied_by_eval(capsys, tmp_path, synth_dir, weights, tiny_name, tok):
    ln_run, coop_run = tmp_path / "ln", tmp_path / "coop"
    rc, _, err = run(capsys, "train", "--method", "ln", "--epochs", 2, "--output", ln_run,
                     *common(synth_dir, weights))
    assert rc == 0, err
    rc, out, err = run(capsys, "train", "--method", "coop", "--epochs", 1, "--init-from", ln_run, "--output",
                       coop_run, *common(synth_dir, weights))
    assert rc == 0, err
    trained = last_json(out)["metrics"]["test"]["top1"]
    meta = cli.common.read_checkpoint_meta(coop_run)
    assert meta["options"]["init_from"] == str((ln_run / "checkpoint.safetensors").resolve())
    rc, out, err = run(capsys, "eval", "--checkpoint", coop_run, "--pretrained", weights,
                       "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress")
    assert rc == 0, err
    assert last_json(out)["top1"] == pytest.approx(trained)
    # eval's restore path brings the LN-tuned LayerNorms back (frozen in this run, so not in its checkpoint)
    from safetensors.torch import load_file

    from leanclip.weights import load_pretrained

    model = open_clip.create_model(tiny_name)
    load_pretrained(model, weights)
    cli.common.prepare_from_checkpoint(model, meta, tok, tiny_name, classnames=meta["options"]["classnames"])
    ln_tuned = load_file(str(ln_run / "checkpoint.safetensors"))
    key = next(k for k in ln_tuned if k.endswith("visual.ln_post.weight"))
    torch.testing.assert_close(model.visual.ln_post.weight.detach(), ln_tuned[key])
    (ln_run / "checkpoint.safetensors").unlink()
    rc, _, err = run(capsys, "eval", "--checkpoint", coop_run, "--pretrained", weights,
                     "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress")
    assert rc == 2 and "init-from" in err and len(err.strip().splitlines()) == 1


def test_init_from_frozen_or_trained(tiny_base, tok, tmp_path):
    """LN-tuned weights as initialisation: ``coop`` keeps them frozen, ``ln+coop`` trains them further."""
    from leanclip.checkpoint import save_trainable

    tuned = prepare(copy.deepcopy(tiny_base), "ln")
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.25)
    save_trainable(tuned, tmp_path / "ln.safetensors")
    names = ["cube", "ball", "cone"]
    frozen = prepare(copy.deepcopy(tiny_base), "coop", classnames=names, tokenizer=tok,
                     init_from=str(tmp_path / "ln.safetensors"))
    trained = prepare(copy.deepcopy(tiny_base), "ln+coop", classnames=names, tokenizer=tok,
                      init_from=str(tmp_path / "ln.safetensors"))
    ln_name = "visual.ln_post.weight"
    for m in (frozen, trained):
        torch.testing.assert_close(dict(m.named_parameters())[ln_name], dict(tuned.named_parameters())[ln_name])
    assert not dict(frozen.named_parameters())[ln_name].requires_grad
    assert dict(trained.named_parameters())[ln_name].requires_grad


def test_init_from_bad_input(capsys, tmp_path, synth_dir, weights):
    rc, _, err = run(capsys, "train", "--method", "coop", "--init-from", tmp_path / "nope", "--output",
                     tmp_path / "out", *common(synth_dir, weights))
    assert rc == 2 and "--init-from" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------ CLIPFit
def test_clipfit_group_ablations(tiny_base):
    both = count_trainable(prepare(copy.deepcopy(tiny_base), "clipfit"))
    text = count_trainable(prepare(copy.deepcopy(tiny_base), "clipfit", image_ln=False))
    image = count_trainable(prepare(copy.deepcopy(tiny_base), "clipfit", text_bias=False))
    assert text > 0 and image > 0 and text + image == both
    image_only = prepare(copy.deepcopy(tiny_base), "clipfit", text_bias=False)
    assert all(n.startswith("visual.") for n, p in image_only.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="nothing to train"):
        prepare(copy.deepcopy(tiny_base), "clipfit", text_bias=False, image_ln=False)
    with pytest.raises(ValueError, match="l2_reg"):
        prepare(copy.deepcopy(tiny_base), "clipfit", l2_reg=-1.0)


def test_clipfit_l2_term_is_the_distance_from_the_start(tiny_base, tok):
    """l2 = lam * sum over the three groups of the mean squared distance of its tensors from their start values;
    its gradient is 2 * lam * (t - t0) / |group| on every trainable tensor."""
    lam = 0.5
    model = prepare(copy.deepcopy(tiny_base), "clipfit", l2_reg=lam, kd_lambda=0.0)
    cfg = TrainConfig()
    step = ClassifyStep(model, ["cube", "ball"], ["a photo of a {}."], tok, cfg=cfg)
    (term,) = step.terms
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for i, p in enumerate(named.values()):
            p.add_(0.01 * (i + 1))
    groups = {}
    for n in named:
        key = "text" if n.startswith("transformer.") else n.rsplit(".", 1)[-1]
        groups.setdefault(key, []).append(n)
    assert set(groups) == {"text", "weight", "bias"}
    expected = lam * sum(sum(float((named[n] - start[n]).detach().double().pow(2).sum()) for n in g) / len(g)
                         for g in groups.values())
    name, value = term(None)
    assert name == "l2" and float(value) == pytest.approx(expected, rel=1e-6)
    value.backward()
    for g in groups.values():
        for n in g:
            torch.testing.assert_close(named[n].grad, 2 * lam * (named[n] - start[n]).detach() / len(g))


def test_clipfit_l2_is_logged_by_the_trainer(capsys, tmp_path, synth_dir, weights):
    rc, _, err = run(capsys, "train", "--method", "clipfit", "--opt", "l2_reg=10", "--opt", "image_ln=false",
                     "--epochs", 1, "--output", tmp_path / "run", *common(synth_dir, weights))
    assert rc == 0, err
    recs = utils.read_jsonl(tmp_path / "run" / "log.jsonl")
    assert recs[0]["l2"] == 0.0 and recs[-1]["l2"] > 0
    assert all(r["loss"] == pytest.approx(r["ce"] + r["kd"] + r["l2"], rel=1e-6) for r in recs)
    meta = cli.common.read_checkpoint_meta(tmp_path / "run")
    assert meta["options"]["l2_reg"] == 10.0 and meta["options"]["image_ln"] is False


def test_template_sets():
    assert get_templates("dtd", template_set="clipfit") == ["a photo of a {}, a type of texture."]
    assert get_templates("dtd") == ["{} texture."]  # CoOp's
    assert {k for k in DATASET_TEMPLATES if DATASET_TEMPLATES[k] != CLIPFIT_TEMPLATES[k]} == {"DTD"}
    with pytest.raises(ValueError, match="template_set"):
        get_templates("dtd", template_set="nope")


@pytest.mark.parametrize("method,flag,expected", [
    ("clipfit", [], "clipfit"), ("ln", [], "coop"), ("clipfit", ["--template-set", "coop"], "coop")])
def test_cli_template_set_follows_the_method(method, flag, expected, capsys, tmp_path, synth_dir, weights,
                                             monkeypatch):
    seen = {}
    import leanclip.cli.classify as classify

    real = classify.get_templates

    def spy(dataset, override=None, **kw):
        seen["set"] = kw.get("template_set")
        return real(dataset, override, **kw)

    monkeypatch.setattr(classify, "get_templates", spy)
    rc, _, err = run(capsys, "train", "--method", method, *flag, "--epochs", 1, "--output", tmp_path / "r",
                     *common(synth_dir, weights))
    assert rc == 0, err
    assert seen["set"] == expected


# --------------------------------------------------------------------------------------------------- LilT's recipe
def test_pair_subset_is_seeded_and_nested():
    from leanclip.pairs import synthetic_pairs

    pairs = synthetic_pairs(40, size=16, seed=0)
    a, b = pairs.subset(10, seed=3), pairs.subset(10, seed=3)
    assert len(a) == 10 and a.captions == b.captions and a.num_images <= 10
    small, large = pairs.subset(5, seed=3), pairs.subset(20, seed=3)
    assert set(small.captions) <= set(large.captions)
    assert pairs.subset(1000, seed=0).captions == pairs.captions
    for j, i in enumerate(a.txt_to_img):  # every kept caption still points at its own image
        k = pairs.captions.index(a.captions[j])
        assert torch.equal(a.images[i], pairs.images[pairs.txt_to_img[k]])


def test_contrastive_recipe_flags(capsys, tmp_path, weights):
    rc, out, err = run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--pretrained", weights,
                       "--synthetic-pairs", 64, "--max-pairs", 32, "--batch-size", 8, "--epochs", 1, "--min-lr",
                       1e-5, "--randaugment", "--synthetic-eval-pairs", 16, "--no-initial-eval", "--no-progress",
                       "--threads", 1, "--output", tmp_path / "lilt")
    assert rc == 0, err
    res = last_json(out)
    assert res["train_pairs"] == 32 and res["steps"] == 4
    cfg = json.loads((tmp_path / "lilt" / "summary.json").read_text())["config"]
    assert cfg["min_lr"] == 1e-5 and cfg["randaugment"] and cfg["augment"]
    recs = utils.read_jsonl(tmp_path / "lilt" / "log.jsonl")
    assert recs[-1]["lr"] > 1e-5  # cosine towards min_lr, never below it
    rc, _, err = run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--max-pairs", 1,
                     "--output", tmp_path / "bad")
    assert rc == 2 and "--max-pairs" in err


def _coop_layout(root, n_classes=3, per_class=2, name="Tiny"):
    """A tiny CoOp-layout dataset (split file + PNGs) the data layer reads."""
    import numpy as np
    from PIL import Image

    items = []
    for c in range(n_classes):
        for k in range(per_class):
            rel = f"images/c{c}_{k}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            colour = np.zeros((16, 16, 3), dtype=np.uint8)
            colour[..., c % 3] = 200
            Image.fromarray(colour).save(root / rel)
            items.append([rel, c, f"colour {c}"])
    (root / f"split_zhou_{name}.json").write_text(json.dumps({"train": items, "val": items, "test": items}))
    return root


def test_contrastive_run_reports_zero_shot_accuracy(capsys, tmp_path, weights):
    root = _coop_layout(tmp_path / "zs")
    rc, out, err = run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--pretrained", weights,
                       "--synthetic-pairs", 16, "--batch-size", 8, "--epochs", 1, "--synthetic-eval-pairs", 8,
                       "--no-initial-eval", "--no-progress", "--threads", 1, "--zeroshot-data", root,
                       "--zeroshot-dataset", "Tiny", "--output", tmp_path / "run")
    assert rc == 0, err
    zs = last_json(out)["zeroshot"]
    assert zs["dataset"] == "Tiny" and zs["n"] == 6 and 0.0 <= zs["top1"] <= 100.0 and zs["top5"] == 100.0
    rc, _, err = run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--zeroshot-data", root,
                     "--output", tmp_path / "bad")
    assert rc == 2 and "go together" in err


def test_contrastive_flags_refused_for_classification(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--method", "ln", "--randaugment", "--output", tmp_path / "x")
    assert rc == 2 and "--randaugment is not read by train --task classify" in err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("shots,dataset,epochs", [(16, None, 200), (8, "DTD", 200), (4, None, 100), (2, None, 100),
                                                   (1, None, 50), (16, "ImageNet", 50), (0, None, 200)])
def test_coop_preset_epochs(shots, dataset, epochs):
    from leanclip.cli.classify import coop_epochs

    assert coop_epochs(shots, dataset) == epochs


def test_coop_preset_replaces_the_method_defaults(capsys, tmp_path, synth_dir, weights):
    """llu declares AdamW at 1e-3, batch 256; --preset coop gives CoOp's recipe; an explicit flag still wins."""
    data = ["--pretrained", weights, "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress",
            "--threads", 1, "--shots", 1]
    rc, _, err = run(capsys, "train", "--method", "llu", "--preset", "coop", "--epochs", 2, "--output",
                     tmp_path / "r", *data)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "r" / "summary.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["weight_decay"], cfg["warmup_epochs"]) == \
        ("sgd", 2e-3, 32, 5e-4, 1)
    assert cfg["epochs"] == 2  # given explicitly


def test_eval_on_another_dataset(capsys, tmp_path, weights):
    """Cross-dataset protocol: a run trained on one dataset is evaluated on another (its classes, its template);
    on the training dataset itself the split file must still be the one the run used."""
    root = _coop_layout(tmp_path / "data", n_classes=3, name="Tiny")
    _coop_layout(tmp_path / "data", n_classes=2, name="Other")
    rc, _, err = run(capsys, "train", "--method", "ln", "--pretrained", weights, "--data", root, "--dataset", "Tiny",
                     "--shots", 2, "--epochs", 1, "--batch-size", 4, "--no-progress", "--threads", 1, "--output",
                     tmp_path / "run")
    assert rc == 0, err
    rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "run", "--pretrained", weights, "--data", root,
                       "--dataset", "Other", "--no-progress")
    assert rc == 0, err
    res = last_json(out)
    assert res["cross_dataset"] and res["dataset"] == "Other" and res["classes"] == 2 and res["n"] == 4
    split = root / "split_zhou_Tiny.json"
    split.write_text(split.read_text().replace('"val"', '"val" ', 1))
    rc, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "run", "--pretrained", weights, "--data", root,
                     "--dataset", "Tiny", "--no-progress")
    assert rc == 2 and "differs from the one the checkpoint was trained with" in err


def test_coop_context_longer_than_the_text_tower_is_refused_before_work(capsys, tmp_path, synth_dir, weights):
    rc, _, err = run(capsys, "train", "--method", "coop", "--opt", "n_ctx=100", "--output", tmp_path / "r",
                     *common(synth_dir, weights))
    assert rc == 2 and "n_ctx=100" in err and not (tmp_path / "r").exists()
