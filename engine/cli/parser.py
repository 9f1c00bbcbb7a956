"""The ``leanclip`` argument parser: one parser for every subcommand, the argument groups they share (model, data,
run), and extension subcommands.

Extension hook: ``register_subcommand(name, module, help)`` (``demo`` -> ``leanclip.cli.demo``, ``bench`` ->
``leanclip.bench.cli`` are pre-registered) adds a subcommand served by ``module.add_arguments(parser)`` +
``module.run(args) -> int``; it is listed only when the module exists and imported only when that subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

from leanclip.cli import contrastive
from leanclip.cli.common import DATA_DEFAULTS, DEFAULT_MODEL, PROG, UsageError
from leanclip.templates import TEMPLATE_SETS

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("leanclip.cli.demo", "train and compare methods on synthetic data, end to end (no downloads)"),
    "bench": ("leanclip.bench.cli", "time and memory benchmarks: fused ops, train steps, largest batch"),
    "analyze": ("leanclip.cli.analyze", "parameter change between runs or from the initial weights (LN shift per layer)"),
    "episodes": ("leanclip.cli.episodes", "evaluate on N-way K-shot episodes (mean accuracy, 95 percent CI)"),
    "sweep": ("leanclip.cli.sweep", "run a protocol grid (methods x datasets x shots x seeds) as resumable cells"),
    "report": ("leanclip.cli.report", "tabulate a sweep (Markdown, CSV, PNG): mean +- std over seeds"),
    "export": ("leanclip.cli.export", "fold a run's trained parameters into its model: one plain state dict"),
    "wilds": ("leanclip.cli.wilds", "evaluate on FMoW / Camelyon17 / iWildCam (WILDS layout) with their metrics"),
    "methods": ("leanclip.cli.methods", "list the PEFT methods, or one method's options (--opt) and traits"),
}

def register_subcommand(name: str, module: str, help: str = "") -> None:
    """Add (or replace) an extension subcommand served by ``module`` (``add_arguments(parser)``, ``run(args)``)."""
    if name in ("train", "eval", "zeroshot"):
        raise ValueError(f"{name!r} is a built-in subcommand")
    SUBCOMMANDS[name] = (module, help)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``leanclip train: error: ...``, exit 2) instead of the usage
    block; ``--help`` is unchanged. Sub-parsers inherit the class."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{sub}{message} (see {self.prog} --help)")

# --------------------------------------------------------------------------------------------------------- arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip model config name, hf-hub:ORG/REPO or local-dir:DIR (config + weights, as "
                        f"open_clip reads them), or transformers:ORG/REPO (a Hugging Face transformers CLIP / "
                        f"SigLIP: the id is the weights); default: {DEFAULT_MODEL}, the tiny test config")
    g.add_argument("--pretrained", metavar="SOURCE", default=None,
                   help="weights: a pretrained tag of --model (e.g. laion2b_s34b_b79k, openai), hf-hub:ORG/REPO, a "
                        "hub folder or a local safetensors / torch file; tags and hub ids are downloaded once into "
                        "the Hugging Face cache (HF_HUB_OFFLINE=1 reads it only). Default: random initialisation")
    g.add_argument("--trust-torchscript", action="store_true",
                   help="allow OpenAI TorchScript .pt archives as --pretrained: loading one RUNS CODE stored in the "
                        "file; only for files you trust (the 'openai' tag gives the same weights as safetensors)")
    g.add_argument("--image-size", type=int, default=None,
                   help="input resolution (default: the model's own); pretrained positional embeddings are resized")
    g.add_argument("--pretrain-steps", type=int, default=None, metavar="N",
                   help="start from N steps of contrastive pre-training on a synthetic caption corpus (made once, "
                        "cached per user). Default: 40 for smoke runs (synthetic data, the default model, no "
                        "--pretrained), so that their accuracy tells whether the pipeline works; 0 otherwise. "
                        "0 = the random initialisation; eval: the number the checkpoint records")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="ROOT", default=None, help="data root holding the dataset (needs --dataset)")
    src.add_argument("--split-file", metavar="F", default=None,
                     help="CoOp split JSON {train,val,test: [[relpath, label, classname], ...]}")
    src.add_argument("--synthetic", action="store_true",
                     help="generate a synthetic dataset (coloured shapes); the default when neither --data nor "
                          "--split-file is given")
    g.add_argument("--dataset", default=None,
                   help="dataset name under --data (e.g. oxford_pets, OxfordPets, dtd, imagenet); also picks the "
                        "prompt template")
    g.add_argument("--image-root", default=None, help="image folder for --split-file (default: next to the file)")
    g.add_argument("--shots", type=int, default=DATA_DEFAULTS["shots"],
                   help=f"K training images per class (0 = the whole train split; default {DATA_DEFAULTS['shots']})")
    g.add_argument("--seed", type=int, default=DATA_DEFAULTS["seed"],
                   help=f"few-shot sampling and training seed (default {DATA_DEFAULTS['seed']})")
    g.add_argument("--subsample", choices=("all", "base", "new"), default=DATA_DEFAULTS["subsample"],
                   help="base-to-new protocol: keep the first half of the classes (base), the rest (new) or all")
    g.add_argument("--eval-split", choices=("test", "val"), default="test", help="split to evaluate (default test)")
    g.add_argument("--templates", nargs="+", default=None, metavar="T",
                   help="prompt template(s) with '{}' for the class name, or 'ensemble' (default: the dataset's "
                        "template of --template-set)")
    g.add_argument("--template-set", choices=tuple(TEMPLATE_SETS), default=None,
                   help="the per-dataset templates: coop (CoOp's) or clipfit (CLIPFit's code; differs on DTD). "
                        "Default: the one the method's paper trains with (clipfit for clipfit, else coop)")
    g.add_argument("--synthetic-classes", type=int, default=DATA_DEFAULTS["synthetic_classes"],
                   help=f"classes of the synthetic dataset (default {DATA_DEFAULTS['synthetic_classes']})")
    g.add_argument("--synthetic-dir", default=None,
                   help="where the synthetic dataset is written (default: a private per-user cache, "
                        "$LEANCLIP_CACHE_DIR or $XDG_CACHE_HOME/leanclip or ~/.cache/leanclip, under synthetic/)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="let a split / list file name images outside the image root (absolute paths, '..', "
                        "symlinks leading out); refused by default")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image the run uses before it starts and leave out unreadable ones (counted "
                        "and reported); without it an unreadable image is an error naming its path")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when a GPU is visible; cuda without a GPU is an error")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=None, help="images per step, the global batch under torchrun (default 32; llu 256)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    g.add_argument("--output", metavar="DIR", default=None, help="run directory (log, checkpoint, result JSON)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``selected``: the subcommand about to run (extension modules are imported only for it;
    the method list in ``train --help`` only then too: importing the model side costs seconds)."""
    parser = _Parser(
        prog=PROG, description="leanclip: kernel-backed, memory-lean parameter-efficient fine-tuning of open_clip "
                               "CLIP models (CLIPFit, LN, BitFit, CoOp, LLU, linear probe, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train_parser(sub, selected)
    _add_eval_parser(sub)
    _add_zeroshot_parser(sub)
    _add_extensions(sub, selected)
    return parser


def _add_train_parser(sub, selected: str | None) -> None:
    if selected == "train":
        from leanclip.methods import METHODS

        method_help = f"PEFT method: one of {', '.join(sorted(METHODS))}, or a '+' combination (default clipfit)"
    else:
        method_help = "PEFT method (default clipfit)"
    t = sub.add_parser("train", help="fine-tune a model (few-shot protocol) and evaluate it",
                       description="Fine-tune with a PEFT method; writes log.jsonl, checkpoint.safetensors (trainable "
                                   "parameters + optimizer, each epoch) and result.json under --output.")
    _add_model_args(t)
    _add_data_args(t)
    g = t.add_argument_group("method and optimisation")
    g.add_argument("--method", default="clipfit",
                   help=method_help)
    g.add_argument("--opt", action="append", default=None, metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --opt rank=4 --opt targets=q,v for lora, --opt beta=0.5 "
                        "for llu, --opt reduction=16 for houlsby); typed and checked against the options the method "
                        "declares (leanclip methods NAME lists them)")
    g.add_argument("--tower", choices=("image", "text", "both"), default="both",
                   help="tower for ln / bitfit (default both)")
    g.add_argument("--recompute", choices=("none", "mlp", "mlp+qkv", "block"), default="none",
                   help="exact activation recompute policy of the lean blocks (default none)")
    g.add_argument("--recompute-chunk", type=int, default=None, metavar="N",
                   help="with --recompute block: run each block's forward and backward N samples at a time, so the "
                        "backward holds one chunk's activations instead of the batch's (same gradients; default: "
                        "the whole batch)")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="the step peak the lean blocks must fit: bytes such as 12GiB, or a fraction of plain "
                        "open_clip's predicted step peak such as 0.2; chooses each block's recompute policy and the "
                        "chunk at the least recompute work (printed, and recorded in result.json)")
    g.add_argument("--no-lean", action="store_true", help="keep open_clip's plain modules (baseline)")
    g.add_argument("--frozen-bf16", action="store_true", help="keep frozen tower weights in bf16")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 10)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; llu / linear-probe 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="sgd (momentum 0.9) or adamw (default sgd; llu / linear-probe adamw)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="constant warm-up epochs at --warmup-lr (default 1; skipped when >= --epochs)")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="warm-up learning rate (default 1e-5)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default off)")
    # shorthands for method options (leanclip.cli.option_flags): None = the method's default
    g.add_argument("--kd-lambda", type=float, default=None,
                   help="CLIPFit distillation weight: the option kd_lambda (default 8)")
    g.add_argument("--llu-lambda", type=float, default=None,
                   help="LLU regulariser weight: the option llu_lambda (default 1e3, the authors' value) on "
                        "mean((W-I)^2)+mean(b^2), the authors' code's form and the default; --opt reg=norm uses the "
                        "paper's ||W-I||+||b||")
    g.add_argument("--llu-clusters", type=int, default=None,
                   help="LLU image bank: at most this many agglomerative cluster centres (0 = all training "
                        "features): the option llu_clusters (default 512)")
    g.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines (default 1)")
    g.add_argument("--preset", choices=("coop", "cocoop", "prograd", "lilt"), default=None,
                   help="a paper's recipe as the defaults of the optimisation flags (explicit flags win; the run "
                        "records it): coop (classification) = SGD 0.002, wd 5e-4, batch 32, 1 warm-up epoch, "
                        "200/100/50 epochs for 16-8/4-2/1 shots (50 on ImageNet), the schedule LLU reports its "
                        "few-shot results with; prograd = coop's; cocoop = coop's at batch 1, 10 epochs; lilt (--task contrastive) = AdamW 1e-4, wd 0.02, 1 warm-up epoch, "
                        "cosine to 1e-5, 15 epochs, global batch 512, 256x256 crops, ALBEF's colour-free "
                        "RandAugment (N=2, M=7)")
    g.add_argument("--init-from", metavar="RUN", default=None,
                   help="start from the trainable weights of another run (checkpoint or run dir), e.g. LN-tuned "
                        "LayerNorms as initialisation: they stay frozen unless --method trains them too "
                        "(--method coop keeps them, --method ln+coop trains them further); recorded, eval re-applies it")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="continue from a checkpoint (file or run dir) exactly where it stopped")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (without it, a folder holding a run is refused)")
    _add_run_args(t)
    contrastive.add_train_arguments(t)  # --task contrastive (LilT, LiT)


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a fine-tuned checkpoint",
                       description="Rebuild the model, re-apply the checkpoint's method and load its trainable "
                                   "parameters, then report top-1 / top-5 accuracy.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint.safetensors written by 'leanclip train' (or its run directory)")
    _add_model_args(e)
    _add_data_args(e)
    _add_run_args(e)
    e.add_argument("--use-recorded-weights", action="store_true",
                   help="load the weights the checkpoint records (a file only if its sha256 still matches) instead "
                        "of naming them with --pretrained")
    # unset data flags are filled from the checkpoint's record (leanclip.cli.common.restore_data)
    e.set_defaults(**{k: None for k in DATA_DEFAULTS})
    contrastive.add_eval_arguments(e)  # --task retrieval


def _add_zeroshot_parser(sub) -> None:
    z = sub.add_parser("zeroshot", help="zero-shot accuracy of a (pretrained) model",
                       description="Zero-shot CLIP classification with hand-written prompts.")
    _add_model_args(z)
    _add_data_args(z)
    _add_run_args(z)


def _add_extensions(sub, selected: str | None) -> None:
    """The registered extension subcommands whose module exists; only ``selected``'s module is imported."""
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            continue
        sp = sub.add_parser(name, help=help_)
        if name == selected:
            mod = importlib.import_module(module)
            mod.add_arguments(sp)
            sp.set_defaults(func=mod.run)
