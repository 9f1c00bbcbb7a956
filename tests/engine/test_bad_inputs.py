"""Every user error of the command line: one line naming the input on stderr, exit 2, no traceback, nothing written.

Each case runs ``leanclip.cli.main`` in a fresh, empty working directory (so the default ``runs/`` folder would show
up there) and checks that the folder is still empty afterwards. The cases cover flags, weights, data files, images,
run folders, checkpoints and the environment; ``BAD_INPUTS`` is also what the closing count of the boundary work was
measured with (``pytest tests/engine/test_bad_inputs.py``).
"""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from leanclip import cli
from leanclip.configs import TINY_CONFIG


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_name):
    """Bad (and a few good) input files, made once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    f = {"dir": d}
    (d / "empty").mkdir()
    (d / "text.safetensors").write_text("not a safetensors file\n")
    (d / "text.pt").write_text("not a torch file\n")
    (d / "a_file").write_text("x")
    f["synth"] = d / "synthetic"
    f["synth"].mkdir(mode=0o700)
    f["synth_open"] = d / "synthetic-open"
    f["synth_open"].mkdir()
    f["synth_open"].chmod(0o777)
    # a split file whose images exist, and variants of it
    img_dir = d / "split"
    img_dir.mkdir()
    for c in range(2):
        for i in range(3):
            Image.new("RGB", (16, 16), (80 * c, 30 * i, 100)).save(img_dir / f"c{c}_{i}.png")
    rows = [[f"c{c}_{i}.png", c, f"class{c}"] for c in range(2) for i in range(3)]

    def split(name, train=rows, test=rows, raw=None):
        p = img_dir / f"split_zhou_{name}.json"
        p.write_text(raw if raw is not None else json.dumps({"train": train, "val": [], "test": test}))
        return p

    f["split_good"] = split("Good")
    f["split_notjson"] = split("NotJson", raw="{not json")
    f["split_list"] = split("List", raw="[1, 2, 3]")
    f["split_nested"] = split("Nested", raw="[" * 100000 + "]" * 100000)
    f["split_strlabel"] = split("StrLabel", train=[["c0_0.png", "zero", "class0"]])
    f["split_neglabel"] = split("NegLabel", train=[["c0_0.png", -1, "class0"]] + rows[1:])
    f["split_dotdot"] = split("DotDot", train=[["../a_file", 0, "class0"]] + rows[1:])
    f["split_abs"] = split("Abs", train=[[str(d / "a_file"), 0, "class0"]] + rows[1:])
    f["split_missing"] = split("Missing", train=[["nope.png", 0, "class0"]] + rows[1:])
    f["split_emptytrain"] = split("EmptyTrain", train=[])
    f["split_emptytest"] = split("EmptyTest", test=[])
    (img_dir / "corrupt.png").write_bytes((img_dir / "c0_0.png").read_bytes()[:40])
    (img_dir / "text.png").write_text("hello")
    f["split_corrupt"] = split("Corrupt", test=[["corrupt.png", 0, "class0"]] + rows[1:])
    f["split_textimg"] = split("TextImg", train=[["text.png", 0, "class0"]], test=[["text.png", 0, "class0"]] + rows)
    one_class = [r for r in rows if r[1] == 0]
    f["split_oneclass"] = split("OneClass", train=one_class, test=one_class)
    # ImageNet layout with a folder that classnames.txt does not list
    inet = d / "inet" / "imagenet"
    for split_dir in ("train", "val"):
        for wnid in ("n01", "n02"):
            (inet / "images" / split_dir / wnid).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(inet / "images" / split_dir / wnid / "a.png")
    (inet / "classnames.txt").write_text("n01 tench\n")
    f["inet_root"] = d / "inet"
    # a TorchScript archive: its code must never run
    ts = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(ts, str(d / "scripted.pt"))
    # a run folder holding a run, and a checkpoint trained on the good split file from random init
    run_dir = d / "run"
    rc = cli.main(["train", "--method", "ln", "--split-file", str(f["split_good"]), "--shots", "1", "--epochs", "1",
                   "--output", str(run_dir), "--no-progress", "--image-size", "32"])
    assert rc == 0
    f["run"] = run_dir
    f["ckpt"] = run_dir / "checkpoint.safetensors"
    raw = bytearray(f["ckpt"].read_bytes())  # the checkpoint with its last 64 bytes (tensor data) damaged
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    f["ckpt_damaged"] = d / "damaged.safetensors"
    f["ckpt_damaged"].write_bytes(bytes(raw))
    # the tiny model's weights with a NaN tensor
    from safetensors.torch import save_file

    from leanclip.configs import create_random_model
    state = {k: v.contiguous() for k, v in create_random_model(tiny_name, 0).state_dict().items()}
    state["visual.conv1.weight"] = torch.full_like(state["visual.conv1.weight"], float("nan"))
    f["nan_weights"] = d / "nan.safetensors"
    save_file(state, str(f["nan_weights"]))
    f["pairs_outside"] = img_dir / "outside.csv"
    f["pairs_outside"].write_text("image,caption\nc0_0.png,a shape\n../a_file,escape\n")
    f["pairs_missing_col"] = d / "pairs.csv"
    f["pairs_missing_col"].write_text("image,text\nc0_0.png,hello\n")
    # model folders (--model local-dir:) whose open_clip_config.json open_clip would turn into a traceback
    for key, change in (("width_neg", {"vision_cfg": {"width": -64}}), ("heads", {"text_cfg": {"heads": 3}}),
                        ("field", {"vision_cfg": {"bogus": 1}}), ("nested", None)):
        folder = f[f"cfg_{key}"] = d / f"model-{key}"
        folder.mkdir()
        cfg = json.loads(json.dumps(TINY_CONFIG))
        for section, values in (change or {}).items():
            cfg[section].update(values)
        text = "[" * 100000 + "]" * 100000 if change is None else json.dumps({"model_cfg": cfg})
        (folder / "open_clip_config.json").write_text(text)
        save_file({"x": torch.zeros(1)}, str(folder / "open_clip_model.safetensors"))
    return f


def _cases(f):
    """(id, argv, env, needle): needle must appear in the one error line (the flag, file or value at fault)."""
    synth = ["--synthetic-dir", str(f["synth"]), "--no-progress"]
    t = ["train", "--method", "ln", "--epochs", "1", "--shots", "1", *synth]
    tc = ["train", "--method", "ln", "--epochs", "1", "--no-progress"]  # --task contrastive reads no dataset flag
    s = lambda k: ["--split-file", str(f[k])]  # noqa: E731
    cases = [
        ("no-command", [], {}, "COMMAND"),
        ("unknown-command", ["frobnicate"], {}, "frobnicate"),
        ("epochs-0", [*t, "--epochs", "0"], {}, "--epochs"),
        ("epochs-neg", [*t, "--epochs", "-1"], {}, "--epochs"),
        ("epochs-text", [*t, "--epochs", "abc"], {}, "--epochs"),
        ("lr-0", [*t, "--lr", "0"], {}, "--lr"),
        ("lr-neg", [*t, "--lr", "-1"], {}, "--lr"),
        ("lr-nan", [*t, "--lr", "nan"], {}, "--lr"),
        ("lr-inf", [*t, "--lr", "inf"], {}, "--lr"),
        ("lr-huge", [*t, "--lr", "1e308"], {}, "--lr"),
        ("batch-0", [*t, "--batch-size", "0"], {}, "--batch-size"),
        ("wd-neg", [*t, "--weight-decay", "-1"], {}, "--weight-decay"),
        ("warmup-neg", [*t, "--warmup-epochs", "-1"], {}, "--warmup-epochs"),
        ("warmup-lr-neg", [*t, "--warmup-lr", "-1e-5"], {}, "--warmup-lr"),
        ("warmup-lr-nan", [*t, "--warmup-lr", "nan"], {}, "--warmup-lr"),
        ("grad-accum-0", [*t, "--grad-accum", "0"], {}, "--grad-accum"),
        ("clip-0", [*t, "--clip-grad-norm", "0"], {}, "--clip-grad-norm"),
        ("clip-nan", [*t, "--clip-grad-norm", "nan"], {}, "--clip-grad-norm"),
        # shorthands for method options: checked against the option's range, on a method that declares it
        ("kd-neg", [*t[:2], "clipfit", *t[3:], "--kd-lambda", "-1"], {}, "--kd-lambda must be"),
        ("kd-nan", [*t[:2], "clipfit", *t[3:], "--kd-lambda", "nan"], {}, "--kd-lambda must be"),
        ("llu-lambda-neg", [*t[:2], "llu", *t[3:], "--llu-lambda", "-1"], {}, "--llu-lambda must be"),
        ("llu-clusters-neg", [*t[:2], "llu", *t[3:], "--llu-clusters", "-1"], {}, "--llu-clusters must be"),
        ("log-every-0", [*t, "--log-every", "0"], {}, "--log-every"),
        ("seed-neg", [*t, "--seed", "-1"], {}, "--seed"),
        ("seed-huge", [*t, "--seed", str(2 ** 32)], {}, "--seed"),
        ("shots-neg", [*t, "--shots", "-1"], {}, "--shots"),
        ("shots-huge-synthetic", [*t, "--shots", "5000"], {}, "--shots 5000"),
        ("synthetic-dir-open", [*t, "--synthetic-dir", str(f["synth_open"])], {}, "writable by group or others"),
        ("output-in-proc", [*t, "--output", "/proc/leanclip-out"], {}, "/proc"),
        ("synthetic-classes-1", [*t, "--synthetic-classes", "1"], {}, "--synthetic-classes"),
        ("workers-neg", [*t, "--num-workers", "-1"], {}, "--num-workers"),
        ("threads-0", [*t, "--threads", "0"], {}, "--threads"),
        ("image-size-4", [*t, "--image-size", "4"], {}, "--image-size"),
        ("image-size-text", [*t, "--image-size", "big"], {}, "--image-size"),
        ("pretrain-steps-neg", [*t, "--pretrain-steps", "-1"], {}, "--pretrain-steps"),
        ("opt-unknown", [*t, "--opt", "nope=1"], {}, "has no option 'nope'"),
        ("opt-no-value", [*t, "--method", "lora", "--opt", "rank"], {}, "KEY=VALUE"),
        ("opt-bad-type", [*t, "--method", "lora", "--opt", "rank=abc"], {}, "expected int"),
        ("opt-bad-value", [*t, "--method", "lora", "--opt", "rank=0"], {}, "rank"),
        # every method option within its declared range (leanclip.registry.OptionRange), before the model is built
        ("lora-rank-huge", [*t, "--method", "lora", "--opt", "rank=99999999999999999999"], {}, "rank"),
        ("lora-rank-over-width", [*t, "--method", "lora", "--opt", "rank=65"], {}, "rank=65 exceeds the width 64"),
        ("lora-alpha-huge", [*t, "--method", "lora", "--opt", "alpha=1e300"], {}, "alpha"),
        ("lora-dropout-1", [*t, "--method", "lora", "--opt", "dropout=1"], {}, "dropout"),
        ("houlsby-reduction-huge", [*t, "--method", "houlsby", "--opt", "reduction=" + "9" * 30], {}, "reduction"),
        ("compacter-n-huge", [*t, "--method", "compacter", "--opt", "n=4096"], {}, "n of method 'compacter'"),
        ("adapter-ratio-2", [*t, "--method", "adapter", "--opt", "ratio=2"], {}, "ratio"),
        ("llu-gamma-huge", [*t, "--method", "llu", "--opt", "gamma=1e308"], {}, "gamma"),
        ("llu-init-seed-huge", [*t, "--method", "llu", "--opt", f"init_seed={2 ** 70}"], {}, "init_seed"),
        ("coop-n-ctx-huge", [*t, "--method", "coop", "--opt", "n_ctx=" + "9" * 20], {}, "n_ctx"),
        ("coop-std-huge", [*t, "--method", "coop", "--opt", "init_text=", "--opt", "std=1e308"], {}, "std"),
        ("coop-std-unused", [*t, "--method", "coop", "--opt", "std=0.5"], {}, "std=0.5 has no effect"),
        ("coop-init-text-long", [*t, "--method", "coop", "--opt", "init_text=" + " ".join(["photo"] * 4000)], {},
         "longer than the tokenizer's 77-token context"),
        ("coop-init-text-other-length", [*t, "--method", "coop", "--opt", "init_text=a photo"], {},
         "init_text 'a photo' is 2 tokens, n_ctx=4"),
        # hostile model configs (--model local-dir:DIR): one line naming the file and the field, before any build
        ("model-config-width-neg", [*t, "--model", f"local-dir:{f['cfg_width_neg']}"], {},
         f"{f['cfg_width_neg'] / 'open_clip_config.json'}: vision_cfg.width"),
        ("model-config-heads", [*t, "--model", f"local-dir:{f['cfg_heads']}"], {},
         f"{f['cfg_heads'] / 'open_clip_config.json'}: text_cfg.heads"),
        ("model-config-unknown-field", [*t, "--model", f"local-dir:{f['cfg_field']}"], {},
         f"{f['cfg_field'] / 'open_clip_config.json'}: vision_cfg.bogus"),
        ("model-config-nested", [*t, "--model", f"local-dir:{f['cfg_nested']}"], {}, "nests too deeply"),
        ("method-unknown", [*t, "--method", "nope"], {}, "nope"),
        ("method-combo-unknown", [*t, "--method", "ln+nope"], {}, "nope"),
        ("method-empty", [*t, "--method", ""], {}, "method"),
        ("model-unknown", [*t, "--model", "NoSuchModel"], {}, "NoSuchModel"),
        ("device-choice", [*t, "--device", "tpu"], {}, "--device"),
        ("precision-choice", [*t, "--precision", "fp8"], {}, "--precision"),
        ("recompute-choice", [*t, "--recompute", "all"], {}, "--recompute"),
        ("recompute-chunk-0", [*t, "--recompute", "block", "--recompute-chunk", "0"], {}, "--recompute-chunk"),
        ("recompute-chunk-no-block", [*t, "--recompute", "mlp", "--recompute-chunk", "2"], {}, "--recompute-chunk"),
        ("recompute-chunk-contrastive", [*tc, "--task", "contrastive", "--recompute-chunk", "2"], {},
         "--recompute-chunk"),
        ("optimizer-choice", [*t, "--optimizer", "lion"], {}, "--optimizer"),
        ("tower-choice", [*t, "--tower", "audio"], {}, "--tower"),
        ("subsample-choice", [*t, "--subsample", "half"], {}, "--subsample"),
        ("pretrained-missing", [*t, "--pretrained", str(f["dir"] / "nope.safetensors")], {}, "nope.safetensors"),
        ("pretrained-dir", [*t, "--pretrained", str(f["dir"] / "empty")], {}, "empty"),
        ("pretrained-text-safetensors", [*t, "--pretrained", str(f["dir"] / "text.safetensors")], {},
         "text.safetensors"),
        ("pretrained-text-pt", [*t, "--pretrained", str(f["dir"] / "text.pt")], {}, "text.pt"),
        ("pretrained-torchscript", [*t, "--pretrained", str(f["dir"] / "scripted.pt")], {}, "scripted.pt"),
        ("pretrained-hf-offline", [*t, "--pretrained", "hf-hub:nobody/nothing"], {"HF_HUB_OFFLINE": "1"},
         "nobody/nothing"),
        ("pretrained-ckpt-as-weights", [*t, "--pretrained", str(f["ckpt"])], {}, "checkpoint.safetensors"),
        ("data-missing", [*t, "--data", str(f["dir"] / "nope"), "--dataset", "OxfordPets"], {}, "nope"),
        ("data-no-dataset", [*t, "--data", str(f["dir"])], {}, "--dataset"),
        ("dataset-no-data", [*t, "--dataset", "OxfordPets"], {}, "--data"),
        ("data-no-split", [*t, "--data", str(f["dir"] / "empty"), "--dataset", "OxfordPets"], {}, "OxfordPets"),
        ("data-and-split", [*t, "--data", "x", "--split-file", "y"], {}, "--split-file"),
        ("split-missing", [*t, "--split-file", str(f["dir"] / "split_zhou_Nope.json")], {}, "split_zhou_Nope"),
        ("split-not-json", [*t, *s("split_notjson")], {}, "NotJson"),
        ("split-list", [*t, *s("split_list")], {}, "List"),
        ("split-nested", [*t, *s("split_nested")], {}, "Nested"),
        ("split-str-label", [*t, *s("split_strlabel")], {}, "StrLabel"),
        ("split-neg-label", [*t, *s("split_neglabel")], {}, "NegLabel"),
        ("split-dotdot", [*t, *s("split_dotdot")], {}, "a_file"),
        ("split-abs", [*t, *s("split_abs")], {}, "a_file"),
        ("split-missing-image", [*t, *s("split_missing")], {}, "nope.png"),
        ("split-empty-train", [*t, *s("split_emptytrain")], {}, "train"),
        ("split-empty-test", [*t, *s("split_emptytest")], {}, "test"),
        ("image-corrupt", [*t, *s("split_corrupt")], {}, "corrupt.png"),
        ("image-text", [*t, *s("split_textimg")], {}, "text.png"),
        ("split-one-class", [*t, *s("split_oneclass")], {}, "OneClass"),
        ("subsample-base-one-class", [*t, *s("split_good"), "--subsample", "base"], {}, "--subsample base"),
        ("zeroshot-one-class", ["zeroshot", *s("split_oneclass"), "--no-progress"], {}, "OneClass"),
        ("pretrained-nan", [*t, "--pretrained", str(f["nan_weights"])], {}, "nan.safetensors"),
        ("init-from-damaged", [*t, "--init-from", str(f["ckpt_damaged"])], {}, "damaged.safetensors"),
        ("eval-checkpoint-damaged", ["eval", "--checkpoint", str(f["ckpt_damaged"]), *s("split_good")], {},
         "damaged.safetensors"),
        ("resume-other-batch", [*t, "--output", str(f["run"]), "--resume", str(f["run"]), *s("split_good"),
                                "--image-size", "32", "--batch-size", "1"], {}, "steps per epoch"),
        ("resume-other-optimizer", [*t, "--output", str(f["run"]), "--resume", str(f["run"]), *s("split_good"),
                                    "--image-size", "32", "--optimizer", "adamw"], {}, "optimizer"),
        ("feature-cache-open", t, {"LEANCLIP_FEATURE_CACHE": str(f["synth_open"])}, "LEANCLIP_FEATURE_CACHE"),
        ("imagenet-unlisted-folder", [*t, "--data", str(f["inet_root"]), "--dataset", "imagenet"], {}, "n02"),
        ("output-is-file", [*t, "--output", str(f["dir"] / "a_file")], {}, "a_file"),
        ("output-under-file", [*t, "--output", str(f["dir"] / "a_file" / "run")], {}, "a_file"),
        ("output-holds-run", [*t, "--output", str(f["run"])], {}, "--overwrite"),
        ("resume-missing", [*t, "--resume", str(f["dir"] / "nope")], {}, "nope"),
        ("resume-text", [*t, "--resume", str(f["dir"] / "text.safetensors")], {}, "text.safetensors"),
        ("resume-other-method", [*t, "--method", "bitfit", "--output", str(f["run"]), "--resume", str(f["run"]),
                                 *s("split_good"), "--image-size", "32"], {}, "method"),
        ("templates-no-placeholder", [*t, "--templates", "a photo"], {}, "{}"),
        ("backend-cuda-no-gpu", t, {"LEANCLIP_BACKEND": "cuda"}, "LEANCLIP_BACKEND"),
        ("backend-unknown", t, {"LEANCLIP_BACKEND": "fast"}, "LEANCLIP_BACKEND"),
        ("contrastive-pairs-missing", [*tc, "--task", "contrastive", "--pairs", str(f["dir"] / "nope.csv")], {},
         "nope.csv"),
        ("contrastive-pairs-columns", [*tc, "--task", "contrastive", "--pairs", str(f["pairs_missing_col"])], {},
         "pairs.csv"),
        ("contrastive-pairs-outside-root", [*tc, "--task", "contrastive", "--pairs", str(f["pairs_outside"])], {},
         "outside the image root"),
        ("contrastive-max-steps-0", [*tc, "--task", "contrastive", "--max-steps", "0"], {}, "--max-steps"),
        ("contrastive-temperature-0", [*tc, "--task", "contrastive", "--temperature", "0"], {}, "--temperature"),
        ("contrastive-temperature-nan", [*tc, "--task", "contrastive", "--temperature", "nan"], {}, "--temperature"),
        ("contrastive-synthetic-pairs-1", [*tc, "--task", "contrastive", "--synthetic-pairs", "1"], {},
         "--synthetic-pairs"),
        ("contrastive-grad-accum", [*tc, "--task", "contrastive", "--grad-accum", "2"], {}, "--grad-accum"),
        ("contrastive-with-data", [*tc, "--task", "contrastive", *s("split_good")], {}, "--split-file"),
        ("eval-no-checkpoint", ["eval", *synth], {}, "--checkpoint"),
        ("eval-checkpoint-missing", ["eval", "--checkpoint", str(f["dir"] / "nope.safetensors"), *synth], {},
         "nope.safetensors"),
        ("eval-checkpoint-text", ["eval", "--checkpoint", str(f["dir"] / "text.safetensors"), *synth], {},
         "text.safetensors"),
        ("eval-checkpoint-empty-dir", ["eval", "--checkpoint", str(f["dir"] / "empty"), *synth], {}, "empty"),
        ("eval-real-data-without-data", ["eval", "--checkpoint", str(f["ckpt"]), *synth], {}, "Good"),
        ("eval-other-split", ["eval", "--checkpoint", str(f["ckpt"]), *s("split_neglabel"), *synth], {},
         "split_zhou_NegLabel"),
        ("eval-recorded-weights-none", ["eval", "--checkpoint", str(f["ckpt"]), "--use-recorded-weights",
                                        *s("split_good")], {}, "--use-recorded-weights"),
        ("eval-retrieval-on-classify", ["eval", "--task", "retrieval", "--checkpoint", str(f["ckpt"]),
                                        "--no-progress"], {}, "contrastive"),
        ("eval-batch-0", ["eval", "--checkpoint", str(f["ckpt"]), "--batch-size", "0", *s("split_good")], {},
         "--batch-size"),
        ("zeroshot-batch-0", ["zeroshot", "--batch-size", "0", *synth], {}, "--batch-size"),
        ("zeroshot-split-choice", ["zeroshot", "--eval-split", "train", *synth], {}, "--eval-split"),
        ("zeroshot-unknown-flag", ["zeroshot", "--bogus", *synth], {}, "--bogus"),
        ("zeroshot-cuda", ["zeroshot", "--device", "cuda", *synth], {}, "cuda"),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda" not in c[0]]
    return cases


# ids are needed at collection time, before the fixture exists: a stand-in mapping gives the same list
class _Names(dict):
    def __missing__(self, k):
        return Path(k)


CASES = _cases(_Names())
BAD_INPUTS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case, files, tmp_path, monkeypatch, capsys):
    _, argv, env, needle = next(c for c in _cases(files) if c[0] == case)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LEANCLIP_TRACEBACK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = sorted(p.name for p in files["dir"].iterdir())
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("leanclip: error:"), err[-2000:]
    assert needle in lines[0], lines[0]
    assert not any(work.iterdir()), sorted(os.listdir(work))  # nothing written
    assert sorted(p.name for p in files["dir"].iterdir()) == before


def test_diverging_run_is_one_line_exit_3(files, tmp_path, monkeypatch, capsys):
    """A learning rate that blows up training: one line naming the step and the likely cause, exit 3, and the last
    checkpoint on disk is a finite one (or none)."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["train", "--method", "full", "--epochs", "3", "--shots", "2", "--lr", "1e4", "--warmup-epochs", "0",
                   "--synthetic-dir", str(files["synth"]), "--no-progress", "--output", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[leanclip]")]
    assert rc == 3, err[-2000:]
    assert len(lines) == 1 and "non-finite" in lines[0] and "learning rate" in lines[0], err[-2000:]
    assert not (out / "result.json").exists()
    ckpt = out / "checkpoint.safetensors"
    if ckpt.exists():
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt)).values())


def test_rejected_overwrite_keeps_the_old_run(files, tmp_path, monkeypatch, capsys):
    """--overwrite deletes the previous run only once every input of the new command was checked; --resume with
    --overwrite is refused before anything is touched."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(tmp_path)
    for extra in (["--split-file", str(files["split_dotdot"])], ["--split-file", str(files["split_corrupt"])],
                  ["--resume", str(run)]):
        rc = cli.main(["train", "--method", "ln", "--epochs", "1", "--shots", "1", "--no-progress", "--image-size",
                       "32", "--output", str(run), "--overwrite", *extra])
        assert rc == 2, capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == before


def test_resume_without_output_continues_in_the_resumed_folder(files, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", "--method", "ln", "--epochs", "2", "--shots", "1", "--no-progress", "--image-size", "32",
                   "--split-file", str(files["split_good"]), "--resume", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1])["output"] == str(run)
    assert not (tmp_path / "runs").exists()


def test_eval_on_another_model_names_both(files, capsys):
    rc = cli.main(["eval", "--checkpoint", str(files["ckpt"]), "--model", "ViT-B-32", "--split-file",
                   str(files["split_good"]), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "trained on model 'leanclip-tiny', not 'ViT-B-32'" in err and len(err) < 1500


def test_weights_recorded_in_another_shape_are_refused():
    import argparse

    from leanclip.cli.common import UsageError, restore_inputs

    meta = {"path": "run/checkpoint.safetensors", "extra": {"config": {"extra": {"pretrained": "w.pt"}}}}
    with pytest.raises(UsageError, match="records its weights as 'pretrained'.*--pretrained"):
        restore_inputs(argparse.Namespace(pretrained=None, model="ViT-B-32"), meta)


def test_recorded_weights_only_hashed_files_or_names(tmp_path, monkeypatch):
    """--use-recorded-weights never reads a recorded path without its hash (a checkpoint is untrusted metadata)."""
    import argparse

    from leanclip.cli.common import recorded_frozen_dtype, restore_weights

    def restore(source, sha256=None, model="ViT-B-32"):
        args = argparse.Namespace(pretrained=None, use_recorded_weights=True, model=model)
        restore_weights(args, {"source": source, "sha256": sha256})
        return args.pretrained

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    for planted in ("~/w.safetensors", "w.safetensors", str(tmp_path / "w.safetensors"), "../w.safetensors"):
        with pytest.raises(ValueError, match="neither a file with its sha256"):
            restore(planted)
    from leanclip.utils import sha256_file

    good = str(tmp_path / "w.safetensors")
    assert restore(good, sha256_file(good)) == good
    with pytest.raises(ValueError, match="changed since training"):
        restore(good, "0" * 64)
    assert restore("laion2b_s34b_b79k") == "laion2b_s34b_b79k"
    assert restore("hf-hub:org/repo") == "hf-hub:org/repo"
    assert recorded_frozen_dtype({"frozen_dtype": "bfloat16"}) == torch.bfloat16
    with pytest.raises(ValueError, match="frozen_dtype"):
        recorded_frozen_dtype({"frozen_dtype": "nn"})


def _tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_run_leaves_its_folder_as_it_was(files, tmp_path, monkeypatch, capsys):
    """Checks that need the prepared model or the config (a resume that cannot continue, NaN starting weights) come
    before the run's first write: no few-shot record, no cleared run, no new folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    before = _tree(run)
    monkeypatch.chdir(tmp_path)
    train = ["train", "--method", "ln", "--epochs", "2", "--shots", "2", "--no-progress", "--image-size", "32",
             "--split-file", str(files["split_good"])]  # 2 shots: a few-shot record the run does not hold yet
    for extra, needle in ((["--resume", str(run), "--batch-size", "1"], "steps per epoch"),
                          (["--resume", str(run), "--optimizer", "adamw"], "optimizer"),
                          (["--output", str(run), "--overwrite", "--pretrained", str(files["nan_weights"])], "NaN"),
                          (["--output", str(tmp_path / "new"), "--pretrained", str(files["nan_weights"])], "NaN")):
        rc = cli.main([*train, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err[-2000:]
        assert _tree(run) == before and sorted(os.listdir(tmp_path)) == ["run"]
