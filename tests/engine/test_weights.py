"""Pretrained weights the way users get them, through the real open_clip + Hugging Face hub path, offline.

Each test lays out a Hugging Face cache under tmp_path (``models--org--repo/refs/main`` holding a revision,
``snapshots/<rev>/open_clip_model.safetensors`` + ``open_clip_config.json``) with weights of the tiny config it makes,
sets ``HF_HUB_OFFLINE=1`` and the cache variables, and checks the loaded tensors equal the made ones.
"""
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import torch

from leanclip import checkpoint, cli, weights
from leanclip.configs import TINY_CONFIG, create_random_model

REPO = Path(__file__).resolve().parents[2]
TAG = "tinytag"


# --------------------------------------------------------------------------------------------------------- helpers
def _made(tiny_name, seed=123, **kw):
    """State dict of the tiny model with its own random init (not the seed-0 init create_model starts from)."""
    return {k: v.detach().clone() for k, v in create_random_model(tiny_name, seed, **kw).state_dict().items()}


def _same(model, sd) -> bool:
    msd = model.state_dict()
    return set(msd) == set(sd) and all(torch.equal(msd[k], v) for k, v in sd.items())


def _save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _open_clip_config(**model_cfg_overrides):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg.update(model_cfg_overrides)
    return {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def lay_out_repo(cache: Path, repo_id: str, sd, *, config=None, bin_only=False) -> Path:
    """A Hugging Face hub cache entry for ``repo_id`` as hf_hub_download leaves it; returns the snapshot folder."""
    rev = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    if bin_only:
        torch.save(sd, snap / "open_clip_pytorch_model.bin")
    else:
        _save_safetensors(sd, snap / "open_clip_model.safetensors")
    (snap / "open_clip_config.json").write_text(json.dumps(config or _open_clip_config()))
    return snap


@pytest.fixture
def tiny_tag(tiny_name, monkeypatch):
    """Register pretrained tag ``tinytag`` of the tiny config in open_clip's registry, on hub repo org/tiny-tag."""
    from open_clip import pretrained as P

    monkeypatch.setitem(P._PRETRAINED, tiny_name, {TAG: P._pcfg(hf_hub="org/tiny-tag/", mean=(0.1, 0.2, 0.3))})
    return "org/tiny-tag"


def _args(*argv):
    return cli.build_parser("zeroshot").parse_args(["zeroshot", *argv])


# --------------------------------------------------------------------------------------------------------- hub + tags
def test_hf_hub_id_from_the_offline_cache(hf_cache, tiny_name):
    made = _made(tiny_name)
    snap = lay_out_repo(hf_cache, "org/tiny", made)
    model = create_random_model(tiny_name)
    info = weights.load_pretrained(model, "hf-hub:org/tiny")
    assert _same(model, made)
    assert info["kind"] == "hf-hub" and info["path"] == str(snap / "open_clip_model.safetensors")
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)  # the repo config's preprocessing
    # leanclip.checkpoint.load_pretrained is the same entry point
    model = create_random_model(tiny_name)
    checkpoint.load_pretrained(model, "hf-hub:org/tiny")
    assert _same(model, made)
    # --model hf-hub:ORG/REPO: config and weights from the hub, as open_clip reads them
    model, tok, size, (mean, std) = cli.build_model(_args("--model", "hf-hub:org/tiny"))
    assert _same(model, made) and size == 32 and mean == (0.5, 0.5, 0.5)


def test_pickle_weights_in_the_hub_are_read_with_weights_only(hf_cache, tiny_name):
    made = _made(tiny_name)
    snap = lay_out_repo(hf_cache, "org/tiny-bin", made, bin_only=True)
    model = create_random_model(tiny_name)
    info = weights.load_pretrained(model, "hf-hub:org/tiny-bin")
    assert _same(model, made) and info["path"] == str(snap / "open_clip_pytorch_model.bin")


def test_pretrained_tag_goes_through_open_clip_and_the_cache(hf_cache, tiny_name, tiny_tag):
    made = _made(tiny_name)
    lay_out_repo(hf_cache, tiny_tag, made)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GELU tag into a GELU model: no QuickGELU warning
        model, tok, size, (mean, std) = cli.build_model(_args("--model", tiny_name, "--pretrained", TAG))
    assert _same(model, made)
    assert mean == (0.1, 0.2, 0.3)  # the tag's preprocessing, as open_clip.create_model attaches it
    r = weights.resolve_pretrained(TAG.upper(), tiny_name)  # open_clip's tag cleaning
    assert r.kind == "tag" and r.path.startswith(str(hf_cache))
    # run records keep tags and hub ids as typed, local paths absolute
    assert weights.recordable_source(TAG, tiny_name) == TAG
    assert weights.recordable_source("hf-hub:org/x", tiny_name) == "hf-hub:org/x"
    assert weights.recordable_source(os.path.relpath(__file__)) == os.path.abspath(__file__)


def test_quickgelu_tag_into_a_gelu_model_warns(hf_cache, tiny_name, monkeypatch):
    from open_clip import pretrained as P

    monkeypatch.setitem(P._PRETRAINED, tiny_name, {"openai": P._pcfg(hf_hub="org/tiny-openai/", quick_gelu=True)})
    made = _made(tiny_name)
    lay_out_repo(hf_cache, "org/tiny-openai", made)
    model = create_random_model(tiny_name)
    with pytest.warns(UserWarning, match="QuickGELU"):
        info = weights.load_pretrained(model, "openai", model_name=tiny_name)
    assert info["openai"] and _same(model, made)


def test_real_open_clip_tags_resolve_to_the_hub_cache(hf_cache):
    """The registry's own entries: ViT-B-32 'openai' is safetensors on the hub (found in the cache when there);
    laion2b_s34b_b79k is not cached here, so offline it is a one-line error naming the hub id."""
    snap = lay_out_repo(hf_cache, "timm/vit_base_patch32_clip_224.openai", {"x": torch.zeros(1)})
    r = weights.resolve_pretrained("openai", "ViT-B-32")
    assert r.kind == "tag" and r.pretrained_cfg["quick_gelu"] and r.path == str(snap / "open_clip_model.safetensors")
    with pytest.raises(weights.WeightsNotCachedError) as err:
        weights.resolve_pretrained("laion2b_s34b_b79k", "ViT-B-32")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg and "downloaded once" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_tag_and_missing_cache_entries_are_one_line_errors(hf_cache, tiny_name, tiny_tag):
    model = create_random_model(tiny_name)
    with pytest.raises(ValueError, match=f"unknown tag for {tiny_name}.*valid tags: {TAG}$") as err:
        weights.load_pretrained(model, "laion2b_s34b_b79k", model_name=tiny_name)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="valid tags: .*laion2b_s34b_b79k"):
        weights.resolve_pretrained("no_such_tag", "ViT-B-32")
    with pytest.raises(ValueError, match="model_name"):  # a bare tag needs the config name
        weights.load_pretrained(model, TAG)
    for source, needle in ((TAG, tiny_tag), ("hf-hub:org/absent", "org/absent")):
        with pytest.raises(weights.WeightsNotCachedError, match=f"{needle} is not in the Hugging Face cache"):
            weights.load_pretrained(model, source, model_name=tiny_name)
    with pytest.raises(weights.WeightsNotCachedError, match="org/absent"):
        weights.create_model("hf-hub:org/absent")
    rc = cli.main(["zeroshot", "--model", "hf-hub:org/absent", "--no-progress"])
    assert rc == 2


def test_env_variables_reach_a_fresh_process(tmp_path, tiny_name):
    """huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import: a new process sees the laid-out cache."""
    made = _made(tiny_name)
    cache = tmp_path / "hf" / "hub"
    lay_out_repo(cache, "org/tiny", made)
    _save_safetensors(made, tmp_path / "made.safetensors")
    code = ("import torch; from leanclip import weights; from leanclip.configs import register_tiny_config;"
            "from safetensors.torch import load_file; register_tiny_config();"
            "m = weights.create_model('hf-hub:org/tiny'); made = load_file(r'%s');"
            "assert all(torch.equal(m.state_dict()[k], v) for k, v in made.items()); print('ok')"
            % (tmp_path / "made.safetensors"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("HF_HUB_CACHE", None)  # HF_HOME alone must be enough
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------- local
def test_hub_folder_and_local_dir(tmp_path, tiny_name):
    made = _made(tiny_name)
    folder = tmp_path / "exported"
    folder.mkdir()
    torch.save(made, folder / "open_clip_pytorch_model.bin")
    model = create_random_model(tiny_name)
    assert weights.load_pretrained(model, folder)["kind"] == "folder" and _same(model, made)
    other = _made(tiny_name, seed=7)
    _save_safetensors(other, folder / "open_clip_model.safetensors")  # open_clip prefers the safetensors file
    model = create_random_model(tiny_name)
    weights.load_pretrained(model, str(folder))
    assert _same(model, other)
    # --model local-dir:DIR reads the folder's open_clip_config.json and its weights
    (folder / "open_clip_config.json").write_text(json.dumps(_open_clip_config()))
    model, tok, size, (mean, std) = cli.build_model(_args("--model", f"local-dir:{folder}"))
    assert _same(model, other) and mean == (0.5, 0.5, 0.5)
    with pytest.raises(cli.UsageError, match="carries its own weights"):
        cli.build_model(_args("--model", f"local-dir:{folder}", "--pretrained", str(folder)))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        weights.create_model(f"local-dir:{tmp_path / 'absent'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file in folder"):
        weights.load_pretrained(create_random_model(tiny_name), empty)


def test_local_files(tmp_path, tiny_name):
    made = _made(tiny_name)
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    _save_safetensors(made, st)
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in made.items()}}, pt)  # open_clip training
    for path in (st, pt, str(st)):
        model = create_random_model(tiny_name)
        info = weights.load_pretrained(model, path)
        assert info["kind"] == "file" and _same(model, made)
    model, *_ = cli.build_model(_args("--pretrained", str(st)))
    assert _same(model, made)
    with pytest.raises(FileNotFoundError, match="no such file"):
        weights.load_pretrained(create_random_model(tiny_name), tmp_path / "absent.safetensors")


def test_a_text_file_named_safetensors_is_a_one_line_error(tmp_path, tiny_name, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_text("these are not weights\nsecond line\n")
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        weights.load_pretrained(create_random_model(tiny_name), bad)
    assert "\n" not in str(err.value)
    junk = tmp_path / "weights.pt"
    junk.write_text("not a pickle either")
    with pytest.raises(ValueError, match="cannot read weights .* safely") as err:
        weights.load_pretrained(create_random_model(tiny_name), junk)
    assert "\n" not in str(err.value)
    rc = cli.main(["zeroshot", "--pretrained", str(bad), "--no-progress"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err_lines) == 1 and "not a readable safetensors file" in err_lines[0]


# --------------------------------------------------------------------------------------------------------- no code runs
class _WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by torch.jit.load) creates ``target`` on disk."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.register_buffer("weight", torch.zeros(2))

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool, torch.Tensor]:
        return (self.target, self.training, self.weight)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, torch.Tensor]) -> None:
        self.target = state[0]
        self.training = state[1]
        self.weight = state[2] + torch.from_file(self.target, True, 2)  # shared=True: creates the file


def test_torchscript_archives_run_no_code_without_opt_in(tmp_path, tiny_name, capsys):
    target = tmp_path / "written-by-the-archive"
    archive = tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
        torch.jit.save(torch.jit.script(_WritesOnLoad(str(target))), str(archive))
    assert not target.exists()
    for path in (archive, tmp_path / "renamed.bin"):
        if path != archive:
            path.write_bytes(archive.read_bytes())
        with pytest.raises(ValueError, match="TorchScript archive.*'openai' tag.*--trust-torchscript") as err:
            weights.load_pretrained(create_random_model(tiny_name), path)
        assert "\n" not in str(err.value)
    assert cli.main(["zeroshot", "--pretrained", str(archive), "--no-progress"]) == 2
    assert "trust-torchscript" in capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").write_bytes(archive.read_bytes())
    with pytest.raises(ValueError, match="TorchScript archive"):
        weights.load_pretrained(create_random_model(tiny_name), folder)
    assert not target.exists()  # nothing in the archive ran
    # with the opt-in the archive is loaded (and its code runs, as the warning says); its keys do not fit the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.warns(UserWarning, match="runs code stored in the file"):
            with pytest.raises(ValueError, match="do not match the model"):
                weights.load_pretrained(create_random_model(tiny_name), archive, trust_torchscript=True)
    assert target.exists()


# --------------------------------------------------------------------------------------------------------- image size
def test_image_size_resizes_the_positional_embedding_as_open_clip_does(tmp_path, tiny_name):
    import open_clip

    made = _made(tiny_name)  # 32 px, patch 8: a 4x4 grid + class token
    path = tmp_path / "w.safetensors"
    _save_safetensors(made, path)
    model, tok, size, _ = cli.build_model(_args("--pretrained", str(path), "--image-size", "48"))
    assert size == 48 and tuple(model.visual.positional_embedding.shape) == (37, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = open_clip.create_model(tiny_name, pretrained=str(path), force_image_size=48)  # open_clip's own loader
    assert _same(model, ref.state_dict())
    assert torch.equal(model.visual.positional_embedding[0], made["visual.positional_embedding"][0])
    info = weights.load_pretrained(create_random_model(tiny_name, force_image_size=48), path)
    assert info["resized_pos_embed"] == [(17, 64), (37, 64)]


# ---------------------------------------------------------------------------------------------------- hostile configs
# (change to the tiny config, what the one error line names): each would allocate without bound or end in a traceback
# inside open_clip / torch if it reached the build
HOSTILE_CONFIGS = [
    ({"vision_cfg": {"width": 10 ** 7}}, "vision_cfg.width"),
    ({"text_cfg": {"layers": 10 ** 6}}, "text_cfg.layers"),
    ({"vision_cfg": {"width": -64}}, "vision_cfg.width"),
    ({"text_cfg": {"width": 64.5}}, "text_cfg.width"),
    ({"text_cfg": {"heads": 0}}, "text_cfg.heads"),
    ({"text_cfg": {"heads": 3}}, "text_cfg.heads"),  # does not divide the width: open_clip asserts
    ({"vision_cfg": {"patch_size": 0}}, "vision_cfg.patch_size"),
    ({"vision_cfg": {"image_size": 10 ** 9}}, "vision_cfg.image_size"),
    ({"text_cfg": {"context_length": 10 ** 6}}, "text_cfg.context_length"),
    ({"text_cfg": {"vocab_size": 10 ** 12}}, "text_cfg.vocab_size"),
    ({"embed_dim": 10 ** 8}, "embed_dim"),
    ({"text_cfg": {"mlp_ratio": float("nan")}}, "text_cfg.mlp_ratio"),  # JSON's NaN literal
    ({"vision_cfg": {"mlp_ratio": 1e308}}, "vision_cfg.mlp_ratio"),
    ({"vision_cfg": {"width": 16384, "head_width": 64, "layers": 256}}, "parameters"),  # each field fits, the total not
    ({"vision_cfg": {"bogus": 1}}, "vision_cfg.bogus"),
]


def _hostile(change: dict) -> dict:
    cfg = _open_clip_config()
    for k, v in change.items():
        cfg["model_cfg"][k] = {**cfg["model_cfg"][k], **v} if isinstance(v, dict) else v
    return cfg


@pytest.fixture
def no_build(monkeypatch):
    """Building a model fails the test: a hostile config must be refused before anything is allocated."""
    def refuse(*a, **k):
        raise AssertionError("the model was built")
    monkeypatch.setattr(weights, "create_random_model", refuse)


def _one_error_line(capsys, argv, cwd) -> str:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("leanclip: error:"), err[-2000:]
    assert not any(cwd.iterdir())  # nothing written
    return lines[0]


@pytest.mark.parametrize("change,field", HOSTILE_CONFIGS, ids=[f for _, f in HOSTILE_CONFIGS])
def test_hostile_local_dir_config_is_refused_before_the_build(change, field, tmp_path, tiny_name, no_build, capsys,
                                                             monkeypatch):
    folder = tmp_path / "exported"
    folder.mkdir()
    _save_safetensors(_made(tiny_name), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(_hostile(change)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    line = _one_error_line(capsys, ["zeroshot", "--model", f"local-dir:{folder}", "--no-progress", "--synthetic-dir",
                                    tmp_path / "synth"], cwd)
    assert f"{folder / 'open_clip_config.json'}: " in line and field in line, line
    with pytest.raises(ValueError, match=field):
        weights.create_model(f"local-dir:{folder}")


@pytest.mark.parametrize("change,field", HOSTILE_CONFIGS[:3] + HOSTILE_CONFIGS[-2:],
                         ids=[f for _, f in HOSTILE_CONFIGS[:3] + HOSTILE_CONFIGS[-2:]])
def test_hostile_hub_config_is_refused_before_the_build(change, field, hf_cache, tmp_path, tiny_name, no_build,
                                                       capsys, monkeypatch):
    snap = lay_out_repo(hf_cache, "org/hostile", _made(tiny_name), config=_hostile(change))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    line = _one_error_line(capsys, ["zeroshot", "--model", "hf-hub:org/hostile", "--no-progress", "--synthetic-dir",
                                    tmp_path / "synth"], cwd)
    assert f"{snap / 'open_clip_config.json'}: " in line and field in line, line


def test_unreadable_configs_and_missing_weights_are_refused_before_the_build(tmp_path, tiny_name, no_build):
    folder = tmp_path / "exported"
    folder.mkdir()
    config = folder / "open_clip_config.json"
    config.write_text(json.dumps(_open_clip_config()))
    with pytest.raises(FileNotFoundError, match="no weights file in folder"):  # open_clip would build it randomly
        weights.create_model(f"local-dir:{folder}")
    _save_safetensors(_made(tiny_name), folder / "open_clip_model.safetensors")
    for text, needle in (("{not json", "not valid JSON"), ("[" * 100000 + "]" * 100000, "nests too deeply"),
                         ("[1, 2]", "no model_cfg object"), (json.dumps({"model_cfg": 3}), "no model_cfg object"),
                         (" " * (weights.CONFIG_FILE_MAX_BYTES + 1) + "{}", "over")):
        config.write_text(text)
        with pytest.raises(ValueError, match=needle) as e:
            weights.create_model(f"local-dir:{folder}")
        assert str(config) in str(e.value) and "\n" not in str(e.value)


def test_a_config_open_clip_still_rejects_is_one_line_naming_the_file(tmp_path, tiny_name):
    folder = tmp_path / "exported"
    folder.mkdir()
    _save_safetensors(_made(tiny_name), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(_hostile({"text_cfg": {"pool_type": "nonsense"}})))
    with pytest.raises(ValueError, match="open_clip cannot build the config in .*open_clip_config.json"):
        weights.create_model(f"local-dir:{folder}")
