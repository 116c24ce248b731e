"""The model pipeline end to end on tiny generated datasets: split, train, export, quantise, calibrate, evaluate,
package (signed, hash-listed) and local adaptation; plus the pure-numpy pieces (splitting, thresholds, AUC)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from edge import signing  # noqa: E402
from sync.core.errors import ModelIntegrityError  # noqa: E402
from models.pipeline import metrics  # noqa: E402
from models.pipeline.data import Sample, dedupe, patient_id, split_groups  # noqa: E402

PATTERNS = ("hstripes", "vstripes", "checker", "disc", "diagonal")
TINY = ["--image-size", "64", "--epochs", "1", "--samples-per-epoch", "32", "--batch-size", "8",
        "--calibration-images", "16", "--resamples", "200", "--val-fraction", "0.25", "--created",
        "2026-01-01T00:00:00Z"]


def _pattern(kind: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(6, 10)
    image = {
        "hstripes": (yy // period) % 2,
        "vstripes": (xx // period) % 2,
        "checker": ((yy // period) + (xx // period)) % 2,
        "disc": ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / rng.uniform(3, 4)) ** 2),
        "diagonal": ((yy + xx) // period) % 2,
    }[kind].astype(np.float32)
    image = 60 + 140 * image + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, classes: list[str], per_class: int, seed: int = 0, splits=("train", "test")) -> Path:
    """Folder-per-class JPEGs with Kermany-style names, two images per patient."""
    rng = np.random.default_rng(seed)
    for split in splits:
        count = per_class if split == "train" else max(6, per_class // 3)
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                person = 1000 * k + i // 2 + (500 if split == "test" else 0)
                rgb = cv2.cvtColor(_pattern(PATTERNS[k], rng), cv2.COLOR_GRAY2BGR)
                cv2.imwrite(str(folder / f"person{person}_{name.lower()}_{i}.jpeg"), rgb)
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    signing.generate_keypair(folder / "test.key", folder / "test.pub")
    return folder / "test.key", folder / "test.pub"


def _run(args: list[str]) -> None:
    from models.pipeline.__main__ import main

    assert main(args) == 0


def _build(tmp: Path, keys, classes: list[str], abnormal: str, name: str) -> tuple[Path, Path]:
    data = make_dataset(tmp / "data", classes, per_class=24)
    work, out = tmp / "work", tmp / "models"
    _run(["all", "--data", str(data), "--work", str(work), "--out-root", str(out), "--name", name,
          "--abnormal", abnormal, "--signing-key", str(keys[0]), "--public-key", str(keys[1]), *TINY])
    return out / name / "1.0.0", work


@pytest.fixture(scope="module")
def binary_package(tmp_path_factory, keys):
    pytest.importorskip("torch")
    return _build(tmp_path_factory.mktemp("binary"), keys, ["NORMAL", "PNEUMONIA"], "pneumonia", "tiny-binary")


@pytest.fixture(scope="module")
def multiclass_package(tmp_path_factory, keys):
    pytest.importorskip("torch")
    return _build(tmp_path_factory.mktemp("multi"), keys, ["femur", "thorax", "brain", "abdomen", "other"],
                  "other", "tiny-bodypart")


def _check_package(folder: Path, pub: Path) -> dict:
    from models.pipeline.package import verify_package

    manifest = verify_package(folder, [pub])
    data = (folder / "manifest.json").read_bytes()
    kid, key = signing.load_public(pub)
    assert signing.verify(data, (folder / "manifest.sig").read_bytes(), {kid: key}) == manifest["signing_key_id"]
    assert data.decode("utf-8") == json.dumps(json.loads(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert set(manifest["files"]) == {"model.int8.onnx", "openvino/model.xml", "openvino/model.bin",
                                      "MODEL_CARD.md", "evaluation.json"}
    for rel in manifest["files"]:
        assert (folder / rel).stat().st_size <= 8 * 1024 * 1024
    assert not list(folder.rglob("*fp32*"))
    assert 0 <= manifest["thresholds"]["review"] <= manifest["thresholds"]["urgent"] <= 1
    assert manifest["input"]["name"] == "input" and manifest["output"] == {"name": "logits", "activation": "softmax"}
    assert manifest["backends"] == {"onnxruntime": "model.int8.onnx", "openvino": "openvino/model.xml"}
    card = (folder / "MODEL_CARD.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and "95 % CI" in card
    try:  # the box's own loader, where it is installed, must accept what the pipeline writes
        from edge.modelpkg import load_package
    except ImportError:
        pass
    else:
        assert load_package(folder, {kid: key}).name == manifest["name"]
    return manifest


def _onnx_input_shape(path: Path) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and session.get_outputs()[0].name == "logits"
    return list(inp.shape)


def test_binary_pipeline_builds_signed_package_whose_files_hash_verify(binary_package, keys):
    folder, work = binary_package
    manifest = _check_package(folder, keys[1])
    assert manifest["task"] == "binary" and manifest["labels"] == ["normal", "pneumonia"]
    assert manifest["abnormal_labels"] == ["pneumonia"]
    assert manifest["input"]["shape"] == [1, 3, 64, 64] == _onnx_input_shape(folder / "model.int8.onnx")
    assert manifest["routing"] == [{"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]}]
    test = manifest["metrics"]["test"]
    assert len(test["auc_ci95"]) == 2 and test["n"] == 16
    report = json.loads((folder / "evaluation.json").read_text())
    assert report["evaluation"]["bootstrap"]["resamples"] == 200
    assert report["training"]["pretrained"] == "imagenet"
    assert (work / "model.fp32.onnx").is_file()


def test_split_keeps_patients_and_duplicate_files_on_one_side(binary_package):
    _, work = binary_package
    split = json.loads((work / "split.json").read_text())
    train = {patient_id(Path(p).name) for p, _ in split["train"]}
    val = {patient_id(Path(p).name) for p, _ in split["val"]}
    assert train and val and not train & val
    assert min(split["counts"]["val"]) > 0


def test_tampered_package_file_is_refused(binary_package, keys, tmp_path):
    from models.pipeline.package import verify_package

    folder = tmp_path / "copy"
    shutil.copytree(binary_package[0], folder)
    with open(folder / "openvino" / "model.bin", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError):
        verify_package(folder, [keys[1]])


def test_package_signed_by_a_foreign_key_is_refused(binary_package, tmp_path):
    from models.pipeline.package import verify_package

    signing.generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(ModelIntegrityError):
        verify_package(binary_package[0], [tmp_path / "other.pub"])


def test_multiclass_pipeline_builds_five_class_package(multiclass_package, keys):
    folder, _ = multiclass_package
    manifest = _check_package(folder, keys[1])
    assert manifest["task"] == "multiclass"
    assert manifest["labels"] == ["abdomen", "brain", "femur", "other", "thorax"]
    assert manifest["abnormal_labels"] == ["other"]
    report = json.loads((folder / "evaluation.json").read_text())
    assert len(report["evaluation"]["multiclass"]["confusion"]) == 5


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_adapt_on_local_folder_writes_new_version_with_before_and_after_metrics(kind, binary_package,
                                                                                multiclass_package, keys, tmp_path):
    folder, work = binary_package if kind == "binary" else multiclass_package
    manifest = json.loads((folder / "manifest.json").read_text())
    classes = ["normal", "pneumonia"] if kind == "binary" else ["femur", "thorax", "brain", "abdomen", "other"]
    local = make_dataset(tmp_path / "local", classes, per_class=20, seed=7, splits=("train",)) / "train"
    out = tmp_path / "models"
    _run(["adapt", "--package", str(folder), "--checkpoint", str(work / "checkpoint.pt"), "--data", str(local),
          "--work", str(tmp_path / "adapt-work"), "--out-root", str(out), "--epochs", "1", "--resamples", "200",
          "--signing-key", str(keys[0]), "--public-key", str(keys[1]), "--trusted-key", str(keys[1])])
    new = out / manifest["name"] / "1.0.1"
    adapted = _check_package(new, keys[1])
    assert adapted["version"] == "1.0.1" and adapted["labels"] == manifest["labels"]
    assert "local_test" in adapted["metrics"] and "local_test_before" in adapted["metrics"]
    assert adapted["metrics"]["local_test_before"]["auc"] is not None
    report = json.loads((new / "evaluation.json").read_text())
    assert report["provenance"]["parent"]["version"] == "1.0.0"
    assert "Before adaptation" in (new / "MODEL_CARD.md").read_text()


def test_weights_recovered_from_a_package_score_like_its_fp32_export(binary_package, tmp_path):
    """No checkpoint at a site: the INT8 graph's weights, dequantised into torch, must reproduce the FP32 model."""
    import onnxruntime as ort
    import torch

    from models.pipeline.data import load_images, normalise
    from models.pipeline.qdq import fp32_from_qdq, torch_from_qdq

    folder, work = binary_package
    manifest = json.loads((folder / "manifest.json").read_text())
    mean, std = manifest["input"]["mean"], manifest["input"]["std"]
    images = load_images(sorted(str(p) for p in (work.parent / "data" / "test").rglob("*.jpeg"))[:12], 64)
    x = np.stack([normalise(image, mean, std) for image in images])
    fp32 = ort.InferenceSession(str(work / "model.fp32.onnx"))
    expected = np.concatenate([fp32.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    model = torch_from_qdq(folder / "model.int8.onnx", 2, 64, tmp_path)
    with torch.inference_mode():
        recovered = model(torch.from_numpy(x)).numpy()
    int8 = ort.InferenceSession(str(folder / "model.int8.onnx"))
    quantised = np.concatenate([int8.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    # only the weights' rounding separates the recovered model from FP32: no further off than the INT8 graph is
    weight_error, int8_error = np.abs(recovered - expected).max(), np.abs(quantised - expected).max()
    print(f"max |recovered - fp32| {weight_error:.4f}, max |int8 - fp32| {int8_error:.4f}")
    assert weight_error <= 1.25 * int8_error + 0.02
    spread = np.abs(expected).max()
    rebuilt = tmp_path / "rebuilt.onnx"
    fp32_from_qdq(folder / "model.int8.onnx", rebuilt)
    graph = ort.InferenceSession(str(rebuilt))
    again = np.concatenate([graph.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    # the ONNX rebuild clamps at the calibrated range, torch at ReLU6: otherwise the two rebuilds are one model
    assert np.abs(again - recovered).max() < 0.01 * spread + 0.01


def test_adapt_without_checkpoint_starts_from_the_package_weights(binary_package, keys, tmp_path):
    folder, _ = binary_package
    manifest = json.loads((folder / "manifest.json").read_text())
    local = make_dataset(tmp_path / "local", ["normal", "pneumonia"], per_class=20, seed=9, splits=("train",))
    out = tmp_path / "models"
    _run(["adapt", "--package", str(folder), "--data", str(local / "train"), "--version", "1.0.5",
          "--work", str(tmp_path / "adapt-work"), "--out-root", str(out), "--epochs", "1", "--resamples", "200",
          "--signing-key", str(keys[0]), "--public-key", str(keys[1]), "--trusted-key", str(keys[1])])
    adapted = _check_package(out / manifest["name"] / "1.0.5", keys[1])
    report = json.loads((out / manifest["name"] / "1.0.5" / "evaluation.json").read_text())
    assert report["provenance"]["parent"]["init"] == "package INT8 weights, dequantised"
    assert "starting weights: package INT8 weights" in (out / manifest["name"] / "1.0.5" / "MODEL_CARD.md").read_text()
    # the tiny patterns are easy: starting from the package's own weights, the adapted model must still separate them
    assert adapted["metrics"]["local_test"]["auc"] >= 0.9
    meta = json.loads((tmp_path / "adapt-work" / "model_meta.json").read_text())
    assert meta["bn_folded"] is True
    from edge import modelpkg

    shown = modelpkg.describe(modelpkg.load_package(out / manifest["name"] / "1.0.5", modelpkg.load_trusted_keys([keys[1]])))
    assert shown["test_split"] == "local_test" and shown["test"]["n"] == adapted["metrics"]["local_test"]["n"]


def test_adapt_refuses_a_checkpoint_the_package_was_not_built_from(binary_package, keys, tmp_path):
    from sync.core.errors import ModelError
    from models.pipeline.adapt import adapt

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not the checkpoint")
    with pytest.raises(ModelError):
        adapt(binary_package[0], bogus, tmp_path, tmp_path / "w", out_root=tmp_path, signing_key=keys[0],
              public_key=keys[1], trusted_keys=[keys[1]])


def test_patient_ids_follow_kermany_file_names():
    assert patient_id("person1000_bacteria_2931.jpeg") == "PERSON1000"
    assert patient_id("person1000_virus_1681.jpeg") == "PERSON1000"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("IM-0115-0001-0002.jpeg") == "IM-0115"
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert patient_id("scan.png") == "scan"


def test_split_groups_patients_and_identical_content_across_patients():
    samples = [Sample(f"/d/person{i // 3}_x_{i}.jpeg", int(i >= 30)) for i in range(60)]
    hashes = [f"h{i}" for i in range(60)]
    hashes[5] = hashes[50] = "same"  # one file duplicated under another patient (and class)
    hashes[7] = hashes[8] = "dup"  # a plain duplicate within a patient
    keep, report = dedupe(samples, hashes)
    assert report == {"duplicate_copies_dropped": 1, "conflicting_label_files_dropped": 2}
    kept = [samples[i] for i in keep]
    train, val = split_groups(kept, 0.3, seed=3, hashes=[hashes[i] for i in keep])
    assert not {patient_id(Path(kept[i].path).name) for i in train} & {patient_id(Path(kept[i].path).name)
                                                                        for i in val}
    assert {kept[i].label for i in val} == {0, 1}
    assert split_groups(kept, 0.3, seed=3, hashes=[hashes[i] for i in keep]) == (train, val)


def test_thresholds_meet_sensitivity_and_specificity_targets_on_validation():
    from models.pipeline.calibrate import choose_thresholds

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300), np.zeros(200)].astype(bool)
    score = np.r_[rng.beta(5, 2, 300), rng.beta(2, 5, 200)]
    t = choose_thresholds(y, score, 0.98, 0.95)
    sens, _ = metrics.sens_spec(y, score, t["review"])
    _, spec = metrics.sens_spec(y, score, t["urgent"])
    assert sens >= 0.98 and spec >= 0.95
    # highest / lowest such thresholds: one step further breaks the target
    assert metrics.sens_spec(y, score, np.nextafter(t["review"], 1))[0] < 0.98
    assert metrics.sens_spec(y, score, np.nextafter(t["urgent"], 0))[1] < 0.95


def test_lower_bound_review_rule_keeps_the_target_with_95_percent_confidence_not_just_on_average():
    from models.pipeline.calibrate import choose_thresholds

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(460), np.zeros(160)].astype(bool)
    score = np.r_[rng.beta(8, 1.5, 460), rng.beta(1.5, 8, 160)]
    plain = choose_thresholds(y, score, 0.98, 0.99)
    bound = choose_thresholds(y, score, 0.98, 0.99, review_rule="lower_bound")
    assert bound["review"] < plain["review"] and "Wilson lower bound" in bound["rule"]["review"]
    caught = int(np.sum(score[y] >= bound["review"]))
    assert metrics.wilson_ci(caught, 460)[0] >= 0.98 > metrics.wilson_ci(caught - 1, 460)[0]
    # and the bands stay ordered with a real review band between them
    assert bound["review"] < bound["urgent"] and not bound["rule"]["urgent_raised_to_review"]


def test_review_threshold_is_extrapolated_below_the_lowest_case_when_few_abnormal_cases():
    from models.pipeline.calibrate import choose_thresholds

    rng = np.random.default_rng(2)
    y = np.r_[np.ones(7), np.zeros(7)].astype(bool)
    score = np.r_[rng.uniform(0.93, 0.999, 7), rng.uniform(0.001, 0.05, 7)]
    t = choose_thresholds(y, score, 0.98, 0.95)
    assert t["rule"]["review_extrapolated"] is True
    # 7 cases cannot show 98 %: the threshold goes below the lowest abnormal score, not onto it
    assert t["review"] < score[y].min() - 0.01
    assert t["review"] > score[~y].max()  # but the fit still sits above these well-separated normals
    many = choose_thresholds(np.r_[np.ones(60), np.zeros(60)].astype(bool),
                             np.r_[rng.uniform(0.5, 1, 60), rng.uniform(0, 0.5, 60)], 0.98, 0.95)
    assert many["rule"]["review_extrapolated"] is False
    # never above the empirical threshold; a single abnormal case sends nearly everything to review
    one = choose_thresholds(np.r_[True, np.zeros(5, bool)], np.r_[0.99, np.full(5, 0.01)], 0.98, 0.95)
    assert one["review"] < 0.05 and "too few" in one["rule"]["review"]
    assert metrics.student_t_quantile(0.02, 6) == pytest.approx(-2.612, abs=0.01)


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(bool)
    score = np.round(rng.random(200), 1)
    pos, neg = score[y], score[~y]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert metrics.auc(y, score) == pytest.approx(expected)


def test_every_pipeline_step_has_help_with_an_example(capsys):
    from models.pipeline.__main__ import STEPS, build_parser

    parser = build_parser()
    for step in STEPS:
        with pytest.raises(SystemExit):
            parser.parse_args([step, "--help"])
        assert f"python -m models.pipeline {step} " in capsys.readouterr().out


def test_package_rebuilt_from_weights_keeps_stem_float_and_widens_thresholds_on_a_test_part(binary_package, keys,
                                                                                           tmp_path):
    """The 1.3.0 recipe on a tiny package: weights from a signed package, the stem and classifier left in float,
    thresholds widened on a calibration part of the test folder and reported on the rest only."""
    import onnx

    folder, work0 = binary_package
    data, work, out = work0.parent / "data", tmp_path / "work", tmp_path / "models"
    _run(["split", "--data", str(data), "--work", str(work), "--name", "tiny-binary", "--version", "1.1.0",
          "--abnormal", "pneumonia", "--image-size", "64", "--val-fraction", "0.25", "--calibration-fraction", "0.5",
          "--quiet-thresholds", "--quantisation", json.dumps({"float_nodes": ["/_conv_stem/", "/_fc/"]})])
    split = json.loads((work / "split.json").read_text())
    cal = {patient_id(Path(p).name) for p, _ in split["calibration"]}
    reported = {patient_id(Path(p).name) for p, _ in split["test_report"]}
    assert cal and reported and not cal & reported
    _run(["weights", "--work", str(work), "--package", str(folder), "--trusted-key", str(keys[1])])
    for step in (["export"], ["quantise", "--calibration-images", "16"], ["calibrate"], ["parity"],
                 ["evaluate", "--resamples", "200"]):
        _run([*step, "--work", str(work)])
    _run(["package", "--work", str(work), "--out-root", str(out), "--signing-key", str(keys[0]),
          "--public-key", str(keys[1]), "--created", "2026-01-01T00:00:00Z"])
    package = out / "tiny-binary" / "1.1.0"
    manifest = _check_package(package, keys[1])
    graph = onnx.load(str(package / "model.int8.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name in ("/_conv_stem/Conv", "/_fc/Gemm"):
            assert producers.get(node.input[1]) != "DequantizeLinear", node.name  # float weights
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 40  # the rest is quantised
    thresholds = json.loads((work / "thresholds.json").read_text())
    assert thresholds["review"] <= thresholds["calibration"]["review"] + 1e-9
    assert thresholds["urgent"] >= thresholds["calibration"]["urgent"] - 1e-9
    assert "quiet" in thresholds["rule"] and manifest["thresholds"]["review"] == thresholds["review"]
    evaluation = json.loads((package / "evaluation.json").read_text())["evaluation"]
    assert evaluation["n"] == len(split["test_report"])
    job = json.loads((work / "config.json").read_text())
    assert job["weights_from"]["version"] == "1.0.0"
    card = (package / "MODEL_CARD.md").read_text()
    assert "calibration part" in card and "no retraining" in card and "kept in float" in card


def test_calibration_part_only_widens_the_review_band():
    from models.pipeline.calibrate import choose_thresholds, with_calibration_part

    rng = np.random.default_rng(1)
    y_val = np.r_[np.ones(300), np.zeros(200)].astype(bool)
    s_val = np.r_[rng.beta(9, 1, 300), rng.beta(1, 9, 200)]  # saturated: the classes hardly overlap
    chosen = choose_thresholds(y_val, s_val, 0.98, 0.995)
    y_cal = np.r_[np.ones(150), np.zeros(100)].astype(bool)
    s_cal = np.r_[rng.beta(5, 2, 150), rng.beta(2, 3, 100)]  # the held-out population's normals score higher
    widened = with_calibration_part(chosen, y_val, s_val, y_cal, s_cal, 0.98, 0.90)
    assert widened["review"] <= chosen["review"] and widened["urgent"] >= chosen["urgent"]
    assert metrics.sens_spec(y_cal, s_cal, widened["urgent"])[1] >= 0.90
    shares = widened["calibration"]["band_shares"]
    assert shares["review"] > 0.05 and abs(sum(shares.values()) - 1) < 1e-9
    assert widened["rule"]["urgent_from"] == "calibration part"


def test_quiet_threshold_moves_off_a_crowd_only_in_the_rule_s_own_direction():
    rng = np.random.default_rng(2)
    logit = np.r_[rng.normal(2.0, 0.05, 200), rng.normal(3.0, 0.5, 50)]  # a crowd at logit 2, sparse above
    a = 1 / (1 + np.exp(-logit))
    b = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.05, len(logit)))))  # the other backend's rounding
    start = float(1 / (1 + np.exp(-2.0)))
    up = metrics.quiet_threshold(start, a, b, +1)
    down = metrics.quiet_threshold(start, a, b, -1)
    flips = lambda t: int(np.sum((a >= t) != (b >= t)))  # noqa: E731
    assert up > start and down < start
    assert np.log(up / (1 - up)) - 2.0 <= 0.25 + 1e-9 and 2.0 - np.log(down / (1 - down)) <= 0.25 + 1e-9
    assert flips(up) < flips(start) and flips(down) < flips(start)
    quiet = np.full(100, 0.1)
    assert metrics.quiet_threshold(0.5, quiet, quiet, +1) == pytest.approx(0.5)  # nothing near: stays
