"""What each ``featurestore`` verb does and prints; the parser is in cli.py.

Each ``cmd_*`` takes the parsed arguments, calls the library (imported inside, so that one verb does not
pay for another's imports) and returns the exit status: 0, or 1 where a check found a problem
(``verify``); errors raise :class:`FeaturestoreError`, which ``cli.main`` prints as one line (status 2).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .errors import BadValueError


def config_from_args(config_class, args: argparse.Namespace):
    """A config dataclass built from the options that cli.add_config_options made of its fields."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)})


def cmd_backbones(args: argparse.Namespace) -> int:
    from .encode.backbones import list_backbones
    from .encode.backbones.torchvision_models import cached_weights_path, default_weights, torchvision_names

    if args.torchvision:
        rows = []
        for name in torchvision_names():
            weights = default_weights(name)
            cached = cached_weights_path(weights).is_file()
            rows.append({"name": f"tv:{name}", "weights": str(weights), "cached": cached})
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                print(f"{row['name']:32s} {row['weights']:48s} {'cached' if row['cached'] else 'not cached'}")
        return 0
    rows = [spec_row(spec) for spec in list_backbones()]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        pre = row.get("preprocessing")
        if pre:
            recipe = (f"input={pre['image_size']}px resize={pre['resize_size']} crop=center {pre['interpolation']} "
                      f"mean={[round(v, 3) for v in pre['mean']]} std={[round(v, 3) for v in pre['std']]}")
        else:
            recipe = f"text: {row['max_seq_length']} tokens, mean pooling, L2-normalised"
        print(f"{row['name']:22s} dim={row['feature_dim']:<5d} {recipe}\n{'':22s} weights: {row['weights_source']}")
    print("tv:<model>             any torchvision classification model with its default weights "
          "(`featurestore backbones --torchvision` lists them)")
    print("timm:<model>           any timm model with a linear classifier, its pretrained_cfg preprocessing, weights "
          "from a local file (--weights)")
    return 0


def spec_row(spec) -> dict:
    row = {"name": spec.name, "kind": spec.kind, "feature_dim": spec.feature_dim,
           "weights_source": spec.weights_source, "description": spec.description}
    if spec.kind == "text":
        row["max_seq_length"] = spec.max_seq_length
    else:
        row["preprocessing"] = spec.preprocessing.as_dict()
    return row


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_fashion_mnist

    counts = prepare_fashion_mnist(
        args.out, args.labels_per_class, args.val_per_class, args.test_per_class, args.seed, args.source,
        progress=not args.no_progress,
    )
    print(json.dumps({"train": counts.train, "val": counts.val, "test": counts.test}))
    return 0


def cmd_prepare_text(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_bbc_news

    counts = prepare_bbc_news(args.out, args.labels_per_class, args.val_per_class, args.test_per_class, args.seed)
    print(json.dumps({"train": counts.train, "val": counts.val, "test": counts.test,
                      "duplicates_dropped": counts.duplicates_dropped}))
    return 0


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this command again under torchrun with ``nproc`` processes on this machine (``--nproc`` dropped)."""
    import subprocess
    import sys

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "featurestore.cli", *rest]
    return subprocess.run(command).returncode


def cmd_extract(args: argparse.Namespace) -> int:
    import os

    if args.nproc > 1 and "RANK" not in os.environ:
        return launch_torchrun(args.nproc, args.argv)
    from .configs import SplitRule
    from .extract import ExtractOptions, extract_features

    options = ExtractOptions(
        weights=args.weights,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        engine=args.engine,
        dtype=args.dtype,
        on_error=args.on_error,
        on_duplicate=args.on_duplicate,
        wait=not args.no_wait,
        progress=not args.no_progress,
        tokenization=text_tokenization(args),
        splits=SplitRule(args.val_fraction, args.test_fraction, args.split_seed),
        exclude=args.exclude,
        layers=args.layers,
    )
    summary = extract_features(args.data, args.out, args.backbone, options=options)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports for the group
        return 0
    if args.json:
        print(summary.to_json())
    else:
        print(
            f"{summary.out}: {summary.extracted} extracted, {summary.resumed} resumed, {summary.reused} reused, "
            f"{len(summary.skipped)} skipped, {len(summary.duplicates)} duplicate groups"
            f"{f', {summary.truncated} truncated' if summary.truncated else ''} in {summary.seconds:.1f} s "
            f"on {summary.device} ({summary.engine}) (fingerprint {summary.fingerprint_hash})"
        )
    return 0


def text_tokenization(args: argparse.Namespace):
    """The tokenization the text options ask for (None: the defaults, or an image backbone). A bad combination
    (say, a stride as long as the window) is a :class:`~featurestore.errors.BadValueError`: exit 2."""
    given = {k: getattr(args, k) for k in ("max_length", "long_documents", "stride", "max_windows")
             if getattr(args, k, None) is not None}
    if not given:
        return None
    from .configs import Tokenization

    return Tokenization(**given)


def cmd_info(args: argparse.Namespace) -> int:
    from .store.hdf5 import FeatureStore

    info = FeatureStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fp = info["fingerprint"]
    print(f"{info['path']} ({info['size_bytes'] / 1e6:.1f} MB, schema {info['schema_version']})")
    print(f"  fingerprint   {info['fingerprint_hash']}")
    print(f"  backbone      {fp['backbone']}  weights sha256 {fp['weights_sha256'][:16]}…")
    if "layer" in fp:
        print(f"  layer         {fp['layer']}")
    print(f"  features      {info['feature_dim']} × {info['dtype']} (computed in {fp['compute']})"
          + (f", rows of shape {info['feature_shape']}" if len(info["feature_shape"]) > 1 else ""))
    if "preprocessing" in fp:
        pre = fp["preprocessing"]
        print(f"  preprocessing {pre['image_size']}px, resize {pre['resize_size']} {pre['interpolation']}, "
              f"centre crop, mean {[round(v, 3) for v in pre['mean']]}, std {[round(v, 3) for v in pre['std']]}")
    if "tokenization" in fp:
        print(f"  tokenization  {fp['tokenization']}  tokenizer sha256 {fp['tokenizer_sha256'][:16]}…")
    print(f"  classes       {len(info['class_names'])}: {', '.join(info['class_names'])}")
    for name, split in info["splits"].items():
        print(f"  split {name:8s}{split['count']:>7d} rows, chunks of {split['chunk_rows']} rows")
    print(f"  code          sha256 {fp.get('code_sha256', '?')[:16]}…  "
          f"{', '.join(fp.get('libraries', {}).values())}")
    if info["skipped"]:
        print(f"  skipped       {len(info['skipped'])} files:")
        for item in info["skipped"]:
            print(f"    {item['path']}: {item['reason']}")
    if info["duplicates"]:
        print(f"  duplicates    {len(info['duplicates'])} groups of identical files across splits or labels:")
        for group in info["duplicates"]:
            print(f"    {' = '.join(group['paths'])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .extract.verify import verify_store

    report = verify_store(args.store, data=args.data, sample=args.sample, seed=args.seed, weights=args.weights,
                          device=args.device, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        verdict = "OK" if report.ok else "DRIFTED"
        print(f"{report.store}: {verdict}. {report.rows} rows hashed against {report.data_root}: "
              f"{len(report.missing)} missing, {len(report.changed)} changed since extraction; {report.sampled} "
              f"re-extracted, largest difference {report.max_abs_diff:.2e} (tolerance {report.atol:g} + "
              f"{report.rtol:g}·|x|), {len(report.drifted_rows)} beyond it")
        for label, items in (("missing", report.missing), ("changed", report.changed)):
            for rel in items[:10]:
                print(f"  {label}: {rel}")
        for item in report.undecodable[:10]:
            print(f"  undecodable: {item['path']}: {item['reason']}")
        for item in report.drifted_rows[:10]:
            print(f"  drifted: {item['path']} (max difference {item['max_abs_diff']:.2e})")
        if report.fingerprint_changes:
            print(f"  since extraction these changed: {', '.join(report.fingerprint_changes)} "
                  f"(a rerun of extract re-extracts everything)")
    return 0 if report.ok else 1


def cmd_train_head(args: argparse.Namespace) -> int:
    from .configs import CHALLENGERS, HeadConfig
    from .heads.train import train_head
    from .store.corrections import open_store

    if args.head in CHALLENGERS:
        return train_challenger(args)
    if args.data:
        raise BadValueError("--data is for --head baseline or hybrid (they read the items; a head reads the store)")
    config = config_from_args(HeadConfig, args)
    head = train_head(open_store(args.features, args.exclude), config, progress=not args.no_progress,
                      scheduler=args.scheduler)
    head.experiment = experiment_name(args.name, Path(args.out), head.backbone, config.head)
    head.save(args.out)
    summary = {**head.summary(), "out": str(args.out)}
    if args.json:
        print(json.dumps(summary))
    else:
        from .heads.summary import shown_setting

        chosen = ", ".join(f"{key}={shown_setting(value)}" for key, value in head.settings.items())
        print(f"{args.out}: {head.name}, {chosen} (best validation accuracy {summary['best_val_accuracy']:.4f} "
              f"over {len(head.sweep)} settings), trained in {head.train_seconds:.1f} s")
    return 0


def train_challenger(args: argparse.Namespace) -> int:
    """``train-head --head baseline | hybrid | small_cnn``: the verdict's challenger fitted on the store's items
    (settings chosen on val, refitted on train+val but for the small CNN), saved as a model file that ``verdict``
    weighs and ``export`` ships."""
    from .store.corrections import open_store
    from .transfer.best import fit_challenger

    if args.name:
        raise BadValueError(f"--name names encoder heads; a {args.head} model is named after its store's backbone")
    model = fit_challenger(args.head, open_store(args.features, args.exclude), data=args.data)
    model.save(args.out)
    chosen = {"lr": model.lr} if args.head == "small_cnn" else {"C": model.C}
    summary = {"out": str(args.out), "name": model.name, "kind": args.head, **chosen,
               "val_accuracy": model.val_accuracy, "n_train": model.n_train, "n_val": model.n_val}
    fitted = (f"trained on {model.n_train} train items (its round and rate chosen on val)" if args.head == "small_cnn"
              else f"refitted on {model.n_train} train+val items")
    print(json.dumps(summary) if args.json else
          f"{args.out}: {model.name}, {', '.join(f'{k}={v:.3g}' for k, v in chosen.items())} (validation accuracy "
          f"{model.val_accuracy:.4f} on {model.n_val} items when fitted on train alone), {fitted}")
    return 0


def experiment_name(given: str | None, out: Path, backbone: str, kind: str) -> str | None:
    """A head experiment's name: ``--name``, else its file's name (without a leading ``<backbone>__``); None when
    that is just its kind (the pipeline's ``data/heads/<store>/<head>.skops``)."""
    name = given or out.name.removesuffix(".skops").removeprefix(f"{backbone}__")
    return None if name == kind else name


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .heads.head import load_head
    from .heads.reports import write_reports
    from .heads.summary import comparison_table
    from .store.corrections import open_store
    from .store.hdf5 import FeatureStore

    heads = [load_head(path, trust_pickle=args.trust_pickle) for path in args.heads]
    stores: dict[str, FeatureStore] = {}
    for path in args.features or []:
        store = open_store(path, args.exclude)
        stores[store.fingerprint["backbone"]] = store
    for head in heads:
        if head.backbone not in stores:
            stores[head.backbone] = open_store(head.store_path, args.exclude)
        warn_if_corrected_apart(head, stores[head.backbone])
    for backbone in dict.fromkeys(head.backbone for head in heads):  # the stores scored, each once
        check_near_duplicates(stores[backbone], args.split, refuse=args.refuse_near_duplicates)
    results = write_reports(heads, stores, args.out, split=args.split, allow_overlap=args.allow_overlap)
    print(json.dumps(results, indent=2) if args.json else comparison_table(results), end="")
    return 0


def warn_if_corrected_apart(head, store) -> None:
    """One warning line when ``head`` was trained through a corrections file (``train-head --exclude``) other than
    the one ``store`` is read through: the items it left out or relabelled count as they are in the store."""
    trained = (head.corrections or {}).get("sha256")
    read = (store.corrections_record or {}).get("sha256")
    if trained and trained != read:
        import logging

        logging.getLogger("featurestore").warning(
            "head %s was trained through the corrections file %s (sha256 %s…), but %s is read %s: pass --exclude with "
            "that file to score it on the corrected items", head.name, head.corrections["file"], trained[:12],
            store.path, "through another" if read else "as written")


def check_near_duplicates(store, split: str, refuse: bool = False) -> None:
    """One warning line when items of ``split`` are near-duplicates of train/val items of ``store`` (resized,
    cropped or re-encoded images, texts with a sentence changed: ``audit.duplicates.find_leaks``); with ``refuse``,
    a :class:`LeakError` instead. Identical items are ``--allow-overlap``'s concern, not this one's."""
    import logging

    from .audit.duplicates import find_leaks
    from .errors import LeakError

    leaks = find_leaks(store, split)
    if not leaks.rows:
        return
    if refuse:
        raise LeakError(f"{store.path}: {leaks.line()}. Remove them from {split}, or drop --refuse-near-duplicates")
    logging.getLogger("featurestore").warning("%s: %s (scored anyway; --refuse-near-duplicates refuses)", store.path,
                                              leaks.line())


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy.deployment import export_model

    # A variant (int8, float16) that fails its check raises ExportError after MODEL.onnx and its report, which
    # holds the variant's figures and the reason, are written. A baseline or hybrid model file (the fine-tune
    # stage's baseline.skops, hybrid.skops) is exported through the same check (deploy/baseline_export.py).
    if args.verdict:
        from .deploy.deployment import deployed_model

        args.head = deployed_model(args.verdict)
    report = export_model(args.head, args.out, backbone=args.backbone, weights=args.weights,
                         trust_pickle=args.trust_pickle, quantize=args.quantize, float16=args.float16,
                         data=args.data, calibration_rows=args.calibration_rows)
    if args.json:
        print(json.dumps(report))
        return 0
    check = report["check"]
    unit = "texts" if report["modality"] == "text" else "images"
    print(f"{report['model']}: {report['name']} ({report['kind']}), {report['size_bytes'] / 1e6:.1f} MB, one graph; "
          f"check on {check['n']} {unit}: max probability difference {check['max_probability_diff']:.2e}, "
          f"labels equal: {check['labels_equal']}")
    if "float16" in report:
        fp16 = report["float16"]
        print(f"{fp16['model']}: {fp16['size_bytes'] / 1e6:.1f} MB, float16 for CUDA; against the float32 graph on "
              f"{fp16['check']['n']} {unit}: max probability difference {fp16['check']['max_probability_diff']:.2e}")
    if "int8" in report:
        int8 = report["int8"]
        decided = int8.get("decided_on", "test")
        figures = "; ".join(
            f"on {r['n']} {split} {unit}{' (decides)' if split == decided else ''}: accuracy {r['accuracy']:.4f} "
            f"(float graph {r['reference_accuracy']:.4f}), labels agree on {r['label_agreement']:.1%}"
            for split in ("val", "test") if (r := int8.get(split)))
        print(f"{int8['model']}: {int8['size_bytes'] / 1e6:.1f} MB, int8 ({int8['quantization']['method']}); {figures}")
    return 0


def cmd_verdict(args: argparse.Namespace) -> int:
    from .transfer.best import verdict, write_verdict

    result = verdict(args.models, incumbent=args.incumbent, data=args.data,
                     relative_to=None if args.out is None else Path(args.out).resolve().parent)
    if args.out:
        write_verdict(result, args.out)
    if args.json:
        print(json.dumps(result))
        return 0
    deployed = result["deployed"]
    for name, candidate in result["candidates"].items():
        print(f"{name:40s} {candidate['kind']:9s} val {candidate['val']:.4f} ({candidate['n']} items)")
    print(f"deployed: {deployed['name']} ({deployed['model']}, {deployed['file']}): {deployed['reason']}")
    if deployed["warning"]:
        print(f"warning: {deployed['warning']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .deploy.predict import predict

    summary = predict(args.model, args.data, args.out, batch_size=args.batch_size, workers=args.workers,
                      provider=args.provider, top_k=args.top_k, split=args.split,
                      progress=not args.no_progress, float16=not args.no_float16, layout=args.layout,
                      recursive=args.recursive)
    if args.json:
        print(summary.to_json())
    else:
        accuracy = "" if summary.accuracy is None else f", accuracy {summary.accuracy:.4f}"
        print(f"{summary.out}: {summary.predicted} items ({summary.layout}) on {summary.provider} "
              f"({Path(summary.model).name}), {len(summary.skipped)} skipped in {summary.seconds:.1f} s{accuracy}")
    return 0


def finetune_config(args: argparse.Namespace, kind: str):
    """The fine-tuning settings: the options given on the command line over the defaults of the modality
    (``image`` or ``text``)."""
    from dataclasses import replace

    from .configs import FinetuneConfig, finetune_defaults

    given = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if getattr(args, f.name, None) is not None}
    return replace(finetune_defaults(kind), **given)


def setfit_config(args: argparse.Namespace):
    """SetFit's settings from the ``--setfit-*`` options (cli.add_prefixed_options), checked by the dataclass."""
    from .configs import SetFitConfig

    return SetFitConfig(**{f.name: getattr(args, "setfit_" + f.name) for f in fields(SetFitConfig)})


def cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .configs import FINETUNE_METHODS, FinetuneConfig
    from .errors import BadValueError
    from .heads import load_head

    head = load_head(args.head, trust_pickle=args.trust_pickle)
    kind = head.fingerprint.get("kind", "image")
    method = args.method or FINETUNE_METHODS[kind][0]
    if method not in FINETUNE_METHODS[kind]:
        raise BadValueError(f"--method {method} applies to text heads; {head.name} is an {kind} head")
    config = finetune_config(args, kind)
    options = {"device": args.device, "progress": not args.no_progress}
    if kind == "text":
        given = [flag for flag, value in (("--weights", args.weights), ("--cache", args.cache)) if value]
        if given:
            raise BadValueError(f"{', '.join(given)} apply to image heads; {head.name} is a text head")
        if method == "setfit":
            from .transfer.setfit import setfit_text

            ignored = [f"--{f.name.replace('_', '-')}" for f in fields(FinetuneConfig)
                       if getattr(args, f.name, None) is not None]
            if ignored:
                raise BadValueError(f"{', '.join(ignored)} set probe_finetune; SetFit's settings are the "
                                    f"--setfit-* options")
            result = setfit_text(head, args.data, args.out, setfit_config(args), **options)
        else:
            from .transfer.text_finetune import finetune_text

            result = finetune_text(head, args.data, args.out, config, **options)
    else:
        from .transfer.finetune import finetune

        result = finetune(head, args.data, args.out, config, weights=args.weights, cache=args.cache, **options)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        cache = f" (trunk cache {result.cache}: {result.cache_seconds:.0f} s)" if result.cache else ""
        print(f"{result.out}: {method}, validation accuracy {result.start_val_accuracy:.4f} (linear probe) → "
              f"{result.best_val_accuracy:.4f} after {result.epochs_run} epochs in {result.seconds:.0f} s{cache}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .configs import CURVE_HEAD, CurveOptions, ScratchConfig, SmallCNNConfig
    from .store import FeatureStore
    from .transfer.curve import accuracy_table, run_curve

    store = FeatureStore(args.features)
    options = CurveOptions(
        budgets=args.budgets, methods=tuple(args.methods) if args.methods else None,
        finetune=finetune_config(args, store.fingerprint.get("kind", "image")),
        scratch=ScratchConfig(**{f.name: getattr(args, "scratch_" + f.name) for f in fields(ScratchConfig)}),
        probe=replace(CURVE_HEAD, normalize=args.normalize),
        small_cnn=SmallCNNConfig(**{f.name: getattr(args, "small_cnn_" + f.name) for f in fields(SmallCNNConfig)}),
        setfit=setfit_config(args), device=args.device, allow_overlap=args.allow_overlap, weights=args.weights,
        layers=args.layers)
    result = run_curve(store, args.data, args.out, options, progress=not args.no_progress)
    table = accuracy_table(result["points"], result.get("picks", []))
    print(json.dumps(result) if args.json else table, end="" if not args.json else "\n")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_store

    summary = audit_store(args.features, args.out, k=args.k, folds=args.folds, force=args.force, head=args.head)
    if args.json:
        print(json.dumps(summary))
        return 0
    issues, duplicates, graph = summary["label_issues"], summary["near_duplicates"], summary["graph"]
    print(f"{args.out}: {'reused (store unchanged), ' if summary['reused'] else ''}{issues['flagged']} of "
          f"{issues['ranked']} labels flagged as issues, {duplicates['pairs']} near-duplicate pairs "
          f"({duplicates['cross_split']} across splits) at similarity >= {duplicates['threshold']:g}; graph "
          f"{graph['kind']}, k={graph['k']}, recall {graph['recall']:.3f} (fingerprint "
          f"{summary['key']['fingerprint_hash']})")
    return 0
