"""WILDS domain-generalisation datasets (FMoW, Camelyon17, iWildCam) read from the ``wilds`` package's on-disk layout,
with their official metrics. The ``wilds`` package itself is not needed: its metadata CSV files are read directly.

    data = load_wilds(ROOT, "fmow")          # ROOT: the folder holding fmow_v1.1/ (or that folder itself)
    data.splits["test"]                      # list[leanclip.data.Sample]; splits train, id_val, id_test, val, test
    data.groups["test"]                      # per sample: its region (FMoW), hospital (Camelyon17), camera (iWildCam)
    wilds_metrics("fmow", preds, labels, data.groups["test"])   # {"acc_avg", "acc_worst_region", "per_group"}
    export_split_file(data, "split_zhou_FMoW.json")              # train / val / test for every leanclip command

Layouts and official splits (as the ``wilds`` loaders define them):

- FMoW (``fmow_v1.1``): ``rgb_metadata.csv`` (split, category, country_code, timestamp; row i is
  ``images/rgb_img_{i}.png``) and ``country_code_mapping.csv`` (alpha-3, region; unknown codes are region "Other").
  Time split at 2016: test = split "test" from 2016 on, val = split "val" from 2013 to 2015; train / id_val / id_test =
  split train / val / test before 2013; "seq" rows are not used. Labels index the 62 fMoW categories (sorted).
  Metric: average and worst-region accuracy (over the regions with samples, "Other" excluded).
- Camelyon17 (``camelyon17_v1.0``): ``metadata.csv`` (patient, node, x_coord, y_coord, tumor, center, split; patient as
  written in the file); image ``patches/patient_{p}_node_{n}/patch_patient_{p}_node_{n}_x_{x}_y_{y}.png``.
  val = center 1, test = center 2, else split 0 = train and 1 = id_val. Label: tumor (0 normal, 1 tumor). Metric:
  average accuracy (per-hospital accuracy alongside).
- iWildCam (``iwildcam_v2.0``): ``metadata.csv`` (split, y, filename, location_remapped) and ``categories.csv`` (y,
  name); image ``train/{filename}``. Splits as the file names them. Metric: average accuracy and macro F1 over the
  classes present in the ground truth (sklearn's ``f1_score(average="macro", labels=unique(y_true))``, as WILDS does).

Every path a CSV names must stay inside the dataset folder (``leanclip.data.ImageRoot``; ``allow_outside_root`` lifts
it); missing images are a FileNotFoundError naming the count and the first few, a missing column a ValueError naming
the file and the column.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
from dataclasses import dataclass, field

import torch

from leanclip import data as D
from leanclip.cli.common import (
    UsageError, check_output, checkpoint_classnames, emit, eval_model, read_checkpoint_meta, setup_device,
    template_override,
)
from leanclip.data import ImageRoot, Sample, write_split_json
from leanclip.cli.episodes import add_model_arguments, add_run_arguments, check_model_arguments, split_features
from leanclip.templates import get_templates

__all__ = ["WILDS_SPLITS", "FMOW_CATEGORIES", "WildsData", "load_wilds", "read_fmow", "read_camelyon17",
           "read_iwildcam", "group_accuracy", "macro_f1", "wilds_metrics", "export_split_file"]

WILDS_SPLITS = ("train", "id_val", "id_test", "val", "test")
FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam", "debris_or_rubble",
    "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road",
    "fountain", "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track", "railway_bridge",
    "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall", "single-unit_residential",
    "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool",
    "toll_booth", "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)
_FOLDERS = {"fmow": "fmow_v1.1", "camelyon17": "camelyon17_v1.0", "iwildcam": "iwildcam_v2.0"}
_METADATA = {"fmow": "rgb_metadata.csv", "camelyon17": "metadata.csv", "iwildcam": "metadata.csv"}
_MAX_REPORTED = 5


@dataclass
class WildsData:
    name: str
    root: str
    classnames: list[str]
    group_field: str                                   # "region" | "hospital" | "location"
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- reading
def _dataset_dir(root, name: str) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"WILDS root {root!r} is not a directory")
    inner = os.path.join(root, _FOLDERS[name])
    if os.path.isdir(inner):
        return inner
    if not os.path.isfile(os.path.join(root, _METADATA[name])):
        raise FileNotFoundError(f"WILDS root {root!r} holds no {_FOLDERS[name]}/ folder (and is not that folder: it "
                                f"has no {_METADATA[name]})")
    return root


def _read_csv(path: str, need: tuple[str, ...]) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {os.path.basename(path)} at {path!r}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path!r} has no column {missing[0]!r} (columns: {reader.fieldnames})")
        return list(reader)


def _int(row: dict, key: str, where: str) -> int:
    try:
        v = float(row[key])
    except (TypeError, ValueError):
        v = float("nan")
    if not v.is_integer():
        raise ValueError(f"{where}: column {key!r} is not an integer: {row[key]!r}")
    return int(v)


def _finish(data: WildsData, entries: list[tuple[str, str, int, str]], check_exists: bool,
            allow_outside_root: bool) -> WildsData:
    """entries: (split, relpath, label, group) -> Samples per split, images checked inside the dataset folder."""
    root = ImageRoot(data.root, f"WILDS {data.name} metadata", allow_outside_root)
    data.splits = {s: [] for s in WILDS_SPLITS}
    data.groups = {s: [] for s in WILDS_SPLITS}
    missing = []
    for i, (split, rel, label, group) in enumerate(entries):
        full = root.join(rel, f"row {i}")
        if check_exists and not os.path.isfile(full):
            missing.append(full)
        data.splits[split].append(Sample(full, label, data.classnames[label]))
        data.groups[split].append(group)
    if missing:
        raise FileNotFoundError(f"WILDS {data.name} at {data.root!r}: {len(missing)} image(s) missing, e.g. "
                                + ", ".join(map(repr, missing[:_MAX_REPORTED])))
    return data


def _utc(stamp: str, where: str) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: timestamp {stamp!r} is not ISO 8601") from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def read_fmow(root, *, check_exists: bool = True, allow_outside_root: bool = False) -> WildsData:
    d = _dataset_dir(root, "fmow")
    meta_path = os.path.join(d, "rgb_metadata.csv")
    rows = _read_csv(meta_path, ("split", "category", "country_code", "timestamp"))
    mapping = _read_csv(os.path.join(d, "country_code_mapping.csv"), ("alpha-3", "region"))
    region_of = {r["alpha-3"]: r["region"] for r in mapping}
    label_of = {c: i for i, c in enumerate(FMOW_CATEGORIES)}
    test_from = _dt.datetime(2016, 1, 1, tzinfo=_dt.timezone.utc)
    val_from = _dt.datetime(2013, 1, 1, tzinfo=_dt.timezone.utc)
    entries = []
    for i, r in enumerate(rows):
        where = f"{meta_path} row {i}"
        if r["split"] == "seq":
            continue
        if r["split"] not in ("train", "val", "test"):
            raise ValueError(f"{where}: unknown split {r['split']!r}")
        if r["category"] not in label_of:
            raise ValueError(f"{where}: unknown fMoW category {r['category']!r}")
        t = _utc(r["timestamp"], where)
        period = "test" if t >= test_from else ("val" if t >= val_from else "id")
        if period == "id":
            split = {"train": "train", "val": "id_val", "test": "id_test"}[r["split"]]
        elif r["split"] == period:
            split = period
        else:
            continue  # e.g. a "train" image from 2016: in no official split
        entries.append((split, os.path.join("images", f"rgb_img_{i}.png"), label_of[r["category"]],
                        region_of.get(r["country_code"], "Other")))
    data = WildsData("fmow", d, [c.replace("_", " ") for c in FMOW_CATEGORIES], "region")
    return _finish(data, entries, check_exists, allow_outside_root)


def read_camelyon17(root, *, check_exists: bool = True, allow_outside_root: bool = False) -> WildsData:
    d = _dataset_dir(root, "camelyon17")
    meta_path = os.path.join(d, "metadata.csv")
    rows = _read_csv(meta_path, ("patient", "node", "x_coord", "y_coord", "tumor", "center", "split"))
    entries = []
    for i, r in enumerate(rows):
        where = f"{meta_path} row {i}"
        center, label = _int(r, "center", where), _int(r, "tumor", where)
        if label not in (0, 1):
            raise ValueError(f"{where}: tumor must be 0 or 1, got {r['tumor']!r}")
        if center == 1:
            split = "val"
        elif center == 2:
            split = "test"
        else:
            split = {0: "train", 1: "id_val"}.get(_int(r, "split", where))
            if split is None:
                raise ValueError(f"{where}: split must be 0 (train) or 1 (id_val), got {r['split']!r}")
        p, n = r["patient"].strip(), _int(r, "node", where)
        x, y = _int(r, "x_coord", where), _int(r, "y_coord", where)
        rel = f"patches/patient_{p}_node_{n}/patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"
        entries.append((split, rel, label, f"hospital {center}"))
    data = WildsData("camelyon17", d, ["normal", "tumor"], "hospital")
    return _finish(data, entries, check_exists, allow_outside_root)


def read_iwildcam(root, *, check_exists: bool = True, allow_outside_root: bool = False) -> WildsData:
    d = _dataset_dir(root, "iwildcam")
    meta_path = os.path.join(d, "metadata.csv")
    rows = _read_csv(meta_path, ("split", "y", "filename", "location_remapped"))
    cats = _read_csv(os.path.join(d, "categories.csv"), ("y", "name"))
    names = {_int(c, "y", "categories.csv"): c["name"] for c in cats}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{os.path.join(d, 'categories.csv')!r}: y must run 0..{len(names) - 1} without gaps")
    entries = []
    for i, r in enumerate(rows):
        where = f"{meta_path} row {i}"
        label = _int(r, "y", where)
        if label not in names:
            raise ValueError(f"{where}: label {label} has no row in categories.csv")
        if r["split"] not in WILDS_SPLITS:
            raise ValueError(f"{where}: unknown split {r['split']!r}")
        entries.append((r["split"], os.path.join("train", r["filename"]), label,
                        f"location {r['location_remapped']}"))
    data = WildsData("iwildcam", d, [names[i] for i in range(len(names))], "location")
    return _finish(data, entries, check_exists, allow_outside_root)


READERS = {"fmow": read_fmow, "camelyon17": read_camelyon17, "iwildcam": read_iwildcam}


def load_wilds(root, name: str, **kw) -> WildsData:
    """One of :data:`READERS` by name (case-insensitive)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in READERS:
        raise ValueError(f"unknown WILDS dataset {name!r}: one of {', '.join(READERS)}")
    return READERS[key](root, **kw)


# ---------------------------------------------------------------------------------------------------- metrics
def _preds_labels(preds, labels) -> tuple[torch.Tensor, torch.Tensor]:
    preds = torch.as_tensor(preds)
    labels = torch.as_tensor(labels).long().flatten()
    if preds.dim() == 2:  # logits
        preds = preds.argmax(1)
    preds = preds.long().flatten()
    if preds.numel() != labels.numel() or labels.numel() == 0:
        raise ValueError(f"preds and labels must be non-empty and of one length, got {preds.numel()} and "
                         f"{labels.numel()}")
    return preds, labels


def group_accuracy(preds, labels, groups, exclude=("Other",)) -> dict:
    """Accuracy (%) overall, per group and of the worst group. ``preds``: (N,) class indices or (N, C) logits;
    ``groups``: (N,) group names. The worst group is taken over the groups with samples, those in ``exclude`` left
    out (WILDS leaves FMoW's "Other" region out); None when no group remains."""
    preds, labels = _preds_labels(preds, labels)
    groups = list(groups)
    if len(groups) != labels.numel():
        raise ValueError(f"groups must have one entry per sample ({labels.numel()}), got {len(groups)}")
    correct = (preds == labels).double()
    per = {}
    for g in sorted(set(groups)):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        per[g] = {"acc": 100.0 * float(correct[idx].mean()), "n": int(idx.numel())}
    ranked = [v["acc"] for g, v in per.items() if g not in exclude]
    return {"acc_avg": 100.0 * float(correct.mean()), "acc_worst_group": min(ranked) if ranked else None,
            "per_group": per}


def macro_f1(preds, labels) -> float:
    """Macro F1 (%) over the classes present in ``labels``: per class c, F1 = 2 TP / (2 TP + FP + FN) (0 when the
    class is never predicted nor present, which cannot happen here), averaged. Predictions of classes absent from
    the labels count as false negatives of the true class only (sklearn's ``labels=unique(y_true)``)."""
    preds, labels = _preds_labels(preds, labels)
    scores = []
    for c in torch.unique(labels).tolist():
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100.0 * sum(scores) / len(scores)


def wilds_metrics(name: str, preds, labels, groups) -> dict:
    """The official metrics of a WILDS dataset: ``acc_avg`` always; FMoW ``acc_worst_region``; iWildCam
    ``f1_macro``; plus ``per_group`` accuracies (regions, hospitals, camera locations)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in READERS:
        raise ValueError(f"unknown WILDS dataset {name!r}: one of {', '.join(READERS)}")
    g = group_accuracy(preds, labels, groups, exclude=("Other",) if key == "fmow" else ())
    out = {"acc_avg": g["acc_avg"]}
    if key == "fmow":
        out["acc_worst_region"] = g["acc_worst_group"]
    if key == "iwildcam":
        out["f1_macro"] = macro_f1(preds, labels)
    out["per_group"] = g["per_group"]
    return out


def export_split_file(data: WildsData, path, *, val: str = "val", test: str = "test") -> str:
    """Write a CoOp split file (train, ``val`` as val, ``test`` as test; e.g. ``val="id_val"``) so that every
    leanclip command reads the dataset with ``--split-file PATH --image-root <dataset folder>``. Returns the path."""
    for flag, v in (("val", val), ("test", test)):
        if v not in WILDS_SPLITS:
            raise ValueError(f"{flag} must be one of {', '.join(WILDS_SPLITS)}, got {v!r}")
    return write_split_json(path, {"train": data.splits["train"], "val": data.splits[val],
                                   "test": data.splits[test]}, data.root)


# ---------------------------------------------------------------------------------------------------- command
def add_arguments(p) -> None:
    p.description = ("Evaluate on a WILDS dataset (FMoW, Camelyon17, iWildCam) read from the wilds package's layout, "
                     "with its official metrics (FMoW worst-region accuracy, iWildCam macro F1, per-group "
                     "accuracy); or export it as a CoOp split file for the other commands.")
    add_model_arguments(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", required=True,
                   help="the folder holding fmow_v1.1/, camelyon17_v1.0/ or iwildcam_v2.0/ (or that folder)")
    g.add_argument("--dataset", required=True, choices=sorted(READERS))
    g.add_argument("--split", choices=WILDS_SPLITS, default="test", help="the split to evaluate (default test)")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="let the metadata name images outside the dataset folder")
    g.add_argument("--export-split", metavar="FILE", default=None,
                   help="write a CoOp split file (train, --export-val, --export-test) and stop; use it with "
                        "--split-file FILE --image-root <dataset folder>")
    g.add_argument("--export-val", choices=WILDS_SPLITS, default="val", help="the split exported as val")
    g.add_argument("--export-test", choices=WILDS_SPLITS, default="test", help="the split exported as test")
    add_run_arguments(p, "wilds.json")


def run(args) -> int:
    check_model_arguments(args)
    if args.export_split and (args.checkpoint or args.pretrained):
        raise UsageError("--export-split writes a split file only: drop --checkpoint / --pretrained")
    if args.output is not None:
        check_output(args.output, resume=None, overwrite=True)
    meta = read_checkpoint_meta(args.checkpoint) if args.checkpoint else None
    data = load_wilds(args.data, args.dataset, allow_outside_root=args.allow_outside_root)
    counts = {s: len(v) for s, v in data.splits.items()}
    if args.export_split:
        path = export_split_file(data, args.export_split, val=args.export_val, test=args.export_test)
        emit({"command": "wilds", "dataset": data.name, "export": path, "image_root": data.root, "splits": counts},
             args, "wilds.json")
        return 0
    samples, groups = data.splits[args.split], data.groups[args.split]
    if not samples:
        raise UsageError(f"the {args.split} split of {data.name} at {data.root!r} is empty")
    train_names = checkpoint_classnames(meta, data.classnames)
    _, bad = D.check_images(samples, decode=False)
    if bad:
        raise bad[0]
    templates = get_templates(None, template_override(args))
    device = setup_device(args)
    model, tok, size, (mean, std) = eval_model(args, meta, train_names)
    model.to(device)
    tf = D.clip_transform(size, train=False, **{k: v for k, v in (("mean", mean), ("std", std)) if v})
    _, logits, labels = split_features(model, D.ImageDataset(samples, tf), data.classnames, templates, tok,
                                       batch_size=args.batch_size or 256, device=device, precision=args.precision,
                                       num_workers=args.num_workers, progress=not args.no_progress)
    result = {"command": "wilds", "dataset": data.name, "split": args.split, "model": args.model,
              "checkpoint": meta["path"] if meta else None, "method": meta["method"] if meta else None,
              "n": len(samples), "classes": len(data.classnames), "templates": templates,
              "group_field": data.group_field, **wilds_metrics(data.name, logits, labels, groups)}
    emit(result, args, "wilds.json")
    return 0
