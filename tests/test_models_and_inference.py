"""Model packages, inference backends, routing and triage, with real onnxruntime and OpenVINO runtimes."""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from edge import modelpkg, routing, triage
from sync.core.errors import ConfigError, InferenceError, ModelError, ModelIntegrityError, NotFoundError
from edge.inference import BACKENDS, create_backend
from edge.modelpkg import activate, active_version, install, load_package, load_trusted_keys, rollback
from modelfactory import brightness_tensor, make_tiny_package, nan_model, signing_key, tiny_model, write_signed_manifest

CPU = ["CPUExecutionProvider"]


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def package_folder(tmp_path: Path, keys_dir: Path) -> Path:
    folder, _ = make_tiny_package(tmp_path / "src", key_dir=keys_dir)
    return folder


@pytest.fixture
def trusted(keys_dir: Path, package_folder: Path) -> dict:
    return load_trusted_keys([keys_dir / "model-signing.pub"])


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# --- verification -------------------------------------------------------------------------------------------

def test_signed_package_loads_and_both_backends_agree_on_brightness(package_folder, trusted):
    pkg = load_package(package_folder, trusted)
    assert (pkg.name, pkg.version, pkg.labels, pkg.abnormal_labels) == \
        ("tiny-cxr", "1.0.0", ("normal", "pneumonia"), ("pneumonia",))
    assert pkg.key_id in trusted and pkg.thresholds.review == 0.3 and pkg.thresholds.urgent == 0.8
    assert set(BACKENDS) >= {"onnxruntime", "openvino"}
    results = {}
    for kind in ("onnxruntime", "openvino"):
        backend = create_backend(pkg, kind, threads=1, providers=["CUDAExecutionProvider", *CPU])
        results[kind] = [backend.predict(brightness_tensor(v)) for v in (-1.0, -0.2, 0.0, 0.5, 1.0)]
        assert backend.timings["median_ms"] is not None
    for ort_p, ov_p in zip(results["onnxruntime"], results["openvino"]):
        assert ort_p.shape == (2,) and np.isclose(ort_p.sum(), 1.0)
        np.testing.assert_allclose(ort_p, ov_p, atol=1e-5)
    abnormal = [p[1] for p in results["onnxruntime"]]
    assert abnormal == sorted(abnormal), "brighter must score more abnormal"
    assert abnormal[0] < 0.01 and abnormal[-1] > 0.99 and abnormal[2] == pytest.approx(0.5, abs=1e-6)
    assert triage.decide(results["openvino"][0], pkg).label == "normal"
    assert triage.decide(results["openvino"][-1], pkg).label == "urgent"


def test_tampering_with_any_byte_of_any_file_is_refused(package_folder, trusted):
    files = sorted(p for p in package_folder.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"manifest.json", "manifest.sig", "model.onnx", "MODEL_CARD.md"}
    for path in files:
        original = path.read_bytes()
        for offset in sorted({0, len(original) // 2, len(original) - 1}):
            flipped = bytearray(original)
            flipped[offset] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(ModelIntegrityError):
                load_package(package_folder, trusted)
            path.write_bytes(original)
    load_package(package_folder, trusted)


def test_missing_listed_file_is_refused_naming_it(package_folder, trusted):
    (package_folder / "evaluation.json").unlink()
    with pytest.raises(ModelIntegrityError, match="evaluation.json"):
        load_package(package_folder, trusted)


def test_unlisted_extra_file_is_refused(package_folder, trusted):
    (package_folder / "extra.onnx").write_bytes(b"not signed")
    with pytest.raises(ModelIntegrityError, match="extra.onnx"):
        load_package(package_folder, trusted)


def test_unsigned_package_is_refused(package_folder, trusted):
    (package_folder / "manifest.sig").unlink()
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        load_package(package_folder, trusted)


def test_foreign_signed_package_is_refused(tmp_path, package_folder, trusted):
    manifest = json.loads((package_folder / "manifest.json").read_text())
    foreign_private, _ = signing_key(tmp_path / "foreign")
    write_signed_manifest(package_folder, manifest, foreign_private)
    with pytest.raises(ModelIntegrityError, match="signature"):
        load_package(package_folder, trusted)


def test_no_trusted_keys_refuses_everything(package_folder):
    with pytest.raises(ModelIntegrityError):
        load_package(package_folder, {})


@pytest.mark.parametrize("bad_path", ["../evil.onnx", "/etc/passwd", "sub/../../evil.onnx", "./model.onnx"])
def test_manifest_path_escaping_the_package_is_refused(tmp_path, keys_dir, bad_path):
    def edit(m):
        m["files"][bad_path] = "0" * 64
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir, edit_manifest=edit)
    with pytest.raises(ModelIntegrityError, match="escapes|POSIX"):
        load_package(folder, load_trusted_keys([pub]))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format=2), "format"),
    (lambda m: m.update(thresholds={"review": 0.9, "urgent": 0.5}), "review"),
    (lambda m: m.update(thresholds={"review": -0.1, "urgent": 0.5}), "review"),
    (lambda m: m.update(abnormal_labels=["effusion"]), "abnormal_labels"),
    (lambda m: m.pop("routing"), "routing"),
    (lambda m: m.update(backends={"onnxruntime": "other.onnx"}), "other.onnx"),
    (lambda m: m.update(routing=[{"PatientName": ["X"]}]), "PatientName"),
])
def test_malformed_but_signed_manifest_is_refused(tmp_path, keys_dir, edit, message):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir, edit_manifest=edit)
    with pytest.raises(ModelError, match=message):
        load_package(folder, load_trusted_keys([pub]))


# --- inference ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_nan_producing_model_raises_inference_error_never_zeros(tmp_path, keys_dir, kind):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir, model=nan_model(64, 2))
    pkg = load_package(folder, load_trusted_keys([pub]))
    with pytest.raises(InferenceError, match="NaN"):
        create_backend(pkg, kind, threads=1, providers=CPU)
    backend = BACKENDS[kind](pkg, 1, CPU)
    backend.load()
    with pytest.raises(InferenceError, match="NaN"):
        backend.predict(brightness_tensor(0.3))


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_output_not_matching_labels_is_an_inference_error(tmp_path, keys_dir, kind):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir,
                                    model=tiny_model(64, ("a", "b", "c"), ("c",)))
    pkg = load_package(folder, load_trusted_keys([pub]))
    with pytest.raises(InferenceError, match="3"):
        create_backend(pkg, kind, threads=1, providers=CPU)


def test_wrong_input_tensor_is_refused(package_folder, trusted):
    backend = create_backend(load_package(package_folder, trusted), "onnxruntime", 1, CPU)
    with pytest.raises(InferenceError, match="float32"):
        backend.predict(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InferenceError, match="float32"):
        backend.predict(np.zeros((1, 3, 64, 64), dtype=np.float64))


def test_auto_picks_an_available_backend_and_logs_medians(package_folder, trusted, caplog):
    caplog.set_level(logging.INFO, logger="edge.inference")
    backend = create_backend(load_package(package_folder, trusted), "auto", threads=1, providers=CPU)
    assert backend.TYPE_KEY in BACKENDS and backend.available()
    assert backend.predict(brightness_tensor(1.0))[1] > 0.99
    assert any("auto backend" in r.getMessage() and "median" in r.getMessage() for r in caplog.records)


def test_auto_keeps_onnxruntime_unless_another_backend_is_clearly_faster():
    from edge.inference import choose_auto

    # within noise of each other: the same choice on every restart
    assert choose_auto({"onnxruntime": 6.0, "openvino": 5.6}) == "onnxruntime"
    assert choose_auto({"onnxruntime": 5.6, "openvino": 6.0}) == "onnxruntime"
    # clearly faster (e.g. OpenVINO on an Intel box with VNNI): that one
    assert choose_auto({"onnxruntime": 6.0, "openvino": 4.0}) == "openvino"
    assert choose_auto({"openvino": 7.0}) == "openvino"


def test_unknown_backend_kind_is_config_error_listing_known_ones(package_folder, trusted):
    with pytest.raises(ConfigError, match=r"'tensorflow'.*auto, onnxruntime, openvino"):
        create_backend(load_package(package_folder, trusted), "tensorflow", 1, CPU)


def test_backend_missing_from_package_is_model_error(tmp_path, keys_dir):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir,
                                    edit_manifest=lambda m: m["backends"].pop("openvino"))
    pkg = load_package(folder, load_trusted_keys([pub]))
    with pytest.raises(ModelError, match="openvino"):
        create_backend(pkg, "openvino", 1, CPU)
    assert create_backend(pkg, "auto", 1, CPU).TYPE_KEY == "onnxruntime"


# --- routing ------------------------------------------------------------------------------------------------

def test_routing_chest_cr_matches_ultrasound_does_not_missing_body_part_matches_empty(package_folder, trusted):
    pkg = load_package(package_folder, trusted)
    chest = Dataset()
    chest.Modality, chest.BodyPartExamined = "CR", "CHEST"
    assert routing.select_models(routing.instance_attrs(chest), [pkg]) == [pkg]
    us = Dataset()
    us.Modality, us.BodyPartExamined = "US", "CHEST"
    assert routing.select_models(routing.instance_attrs(us), [pkg]) == []
    no_part = Dataset()
    no_part.Modality = "DX"
    assert routing.instance_attrs(no_part)["BodyPartExamined"] == ""
    assert routing.select_models(routing.instance_attrs(no_part), [pkg]) == [pkg]
    assert routing.select_models({"Modality": "dx ", "BodyPartExamined": "Chest"}, [pkg]) == [pkg]
    assert routing.select_models({"Modality": "DX", "BodyPartExamined": "HAND"}, [pkg]) == []


def test_routing_any_rule_selects_and_absent_key_means_any(tmp_path, keys_dir):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir,
                                    routing=[{"Modality": ["MG"]}, {"Modality": ["CR"], "ViewPosition": ["PA"]}])
    pkg = load_package(folder, load_trusted_keys([pub]))
    assert routing.select_models({"Modality": "MG", "BodyPartExamined": "BREAST"}, [pkg]) == [pkg]
    assert routing.select_models({"Modality": "CR", "ViewPosition": "pa"}, [pkg]) == [pkg]
    assert routing.select_models({"Modality": "CR", "ViewPosition": "AP"}, [pkg]) == []


# --- triage -------------------------------------------------------------------------------------------------

def test_triage_bands_boundaries_and_reasons(package_folder, trusted):
    pkg = load_package(package_folder, trusted)
    for p_abn, label, code in [(0.1, "normal", "score_below_review"), (0.3, "review", "score_above_review"),
                               (0.79, "review", "score_above_review"), (0.8, "urgent", "score_above_urgent"),
                               (1.0, "urgent", "score_above_urgent")]:
        d = triage.decide(np.array([1 - p_abn, p_abn]), pkg)
        assert (d.label, d.reasons[0]["code"]) == (label, code)
        assert d.score == pytest.approx(p_abn)
    d = triage.decide(np.array([0.07, 0.93]), pkg)
    assert d.reasons == [{"code": "score_above_urgent", "score": 0.93, "threshold": 0.8}]
    with pytest.raises(InferenceError):
        triage.decide(np.array([np.nan, 0.5]), pkg)
    with pytest.raises(InferenceError):
        triage.decide(np.array([0.2, 0.3, 0.5]), pkg)


def test_multiclass_low_confidence_goes_to_review(tmp_path, keys_dir):
    folder, pub = make_tiny_package(tmp_path, key_dir=keys_dir, labels=("normal", "pneumonia", "effusion"),
                                    abnormal=("pneumonia", "effusion"), review_if_confidence_below=0.6,
                                    thresholds={"review": 0.4, "urgent": 0.9})
    pkg = load_package(folder, load_trusted_keys([pub]))
    assert pkg.task == "multiclass"
    confident = triage.decide(np.array([0.9, 0.05, 0.05]), pkg)
    assert confident.label == "normal" and len(confident.reasons) == 1
    unsure = triage.decide(np.array([0.55, 0.25, 0.20]), pkg)
    assert unsure.label == "review"
    assert unsure.reasons[-1] == {"code": "low_confidence", "label": "normal", "confidence": 0.55, "threshold": 0.6}
    assert triage.decide(np.array([0.0, 0.5, 0.5]), pkg).label == "urgent"


def test_most_severe_and_no_model():
    assert [triage.severity(x) for x in triage.LABELS] == [0, 1, 2]
    assert triage.most_severe(["normal", "urgent", "review"]) == "urgent"
    assert triage.most_severe(["normal", "normal"]) == "normal"
    assert triage.most_severe([]) == "review"
    assert triage.NO_MODEL.label == "review" and triage.NO_MODEL.score is None
    assert triage.NO_MODEL.reasons == [{"code": "no_model"}]
    with pytest.raises(ValueError):
        triage.severity("fine")


# --- models directory: install, activate, rollback ----------------------------------------------------------

def test_no_active_file_means_highest_semantic_version(tmp_path, keys_dir):
    models = tmp_path / "models"
    for v in ("1.9.0", "1.10.0", "1.2.3"):
        make_tiny_package(models, version=v, key_dir=keys_dir)
    assert [f.name for f in modelpkg.discover(models)] == ["1.2.3", "1.9.0", "1.10.0"]
    assert active_version(models, "tiny-cxr") == "1.10.0"
    assert modelpkg.active_folders(models) == [models / "tiny-cxr" / "1.10.0"]


def test_activate_and_rollback_swap_active_and_previous(tmp_path, keys_dir):
    models = tmp_path / "models"
    for v in ("1.0.0", "1.1.0"):
        make_tiny_package(models, version=v, key_dir=keys_dir)
    name_dir = models / "tiny-cxr"
    activate(models, "tiny-cxr", "1.0.0")
    assert (name_dir / "ACTIVE").read_text().strip() == "1.0.0"
    assert (name_dir / "PREVIOUS").read_text().strip() == "1.1.0"  # the implicit highest was active before
    activate(models, "tiny-cxr", "1.1.0")
    assert active_version(models, "tiny-cxr") == "1.1.0"
    assert rollback(models, "tiny-cxr") == "1.0.0"
    assert active_version(models, "tiny-cxr") == "1.0.0"
    assert (name_dir / "PREVIOUS").read_text().strip() == "1.1.0"
    assert rollback(models, "tiny-cxr") == "1.1.0"
    assert not [p for p in name_dir.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(NotFoundError):
        activate(models, "tiny-cxr", "9.9.9")
    with pytest.raises(NotFoundError):
        rollback(models, "other-model")


def test_install_from_folder_and_tar_then_activate(tmp_path, keys_dir, trusted, package_folder):
    models = tmp_path / "models"
    pkg = install(package_folder, models, trusted)
    assert pkg.folder == models / "tiny-cxr" / "1.0.0"
    assert tree(pkg.folder) == tree(package_folder)
    assert install(package_folder, models, trusted).folder == pkg.folder  # same content again: no-op

    v2, _ = make_tiny_package(tmp_path / "src", version="2.0.0", key_dir=keys_dir)
    archive = tmp_path / "tiny-cxr-2.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(v2, arcname="tiny-cxr-2.0.0")
    installed = install(archive, models, trusted)
    assert installed.version == "2.0.0" and active_version(models, "tiny-cxr") == "2.0.0"
    activate(models, "tiny-cxr", "1.0.0")
    assert rollback(models, "tiny-cxr") == "2.0.0"
    assert not [p for p in models.rglob(".*")], "no scratch left behind"


def test_install_of_tampered_package_leaves_models_dir_unchanged(tmp_path, keys_dir, trusted, package_folder):
    models = tmp_path / "models"
    install(package_folder, models, trusted)
    activate(models, "tiny-cxr", "1.0.0")
    before = tree(models)
    v2, _ = make_tiny_package(tmp_path / "src", version="2.0.0", key_dir=keys_dir)
    model = v2 / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelIntegrityError, match="model.onnx"):
        install(v2, models, trusted)
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(v2, arcname=".")
    with pytest.raises(ModelIntegrityError):
        install(archive, models, trusted)
    assert tree(models) == before


def test_install_same_version_with_other_content_is_refused(tmp_path, keys_dir, trusted, package_folder):
    models = tmp_path / "models"
    install(package_folder, models, trusted)
    other, _ = make_tiny_package(tmp_path / "other", key_dir=keys_dir, thresholds={"review": 0.2, "urgent": 0.7})
    with pytest.raises(ModelError, match="already installed"):
        install(other, models, trusted)


def test_engine_falls_back_to_the_newest_version_that_verifies_when_the_active_one_is_tampered(tmp_path):
    from edge import config as config_mod
    from edge.engine import Engine

    models = tmp_path / "models"
    _good, pub = make_tiny_package(models, version="1.0.0", key_dir=tmp_path / "keys")
    bad, _ = make_tiny_package(models, version="1.1.0", key_dir=tmp_path / "keys")
    (bad / "model.onnx").write_bytes(b"tampered")
    cfg = config_mod.parse(f'[models]\ndir = "{models}"\ntrusted_keys = ["{pub}"]\n[inference]\nbackend = "onnxruntime"\n')
    engine = Engine.load(cfg)
    assert [m.package.version for m in engine.models] == ["1.0.0"]
    assert any("1.1.0" in e for e in engine.load_errors)


def _half_bright_cr(white_columns: int):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = np.zeros((64, 64), np.uint8)
    pixels[:, :white_columns] = 255
    ds.PixelData = pixels.tobytes()
    return ds


def test_each_backend_applies_its_own_validated_thresholds(tmp_path):
    """INT8 models from two quantisers shift scores differently; the manifest may carry thresholds per backend."""
    from edge import config as config_mod
    from edge.engine import Engine

    by_backend = {"onnxruntime": {"review": 0.3, "urgent": 0.8}, "openvino": {"review": 0.65, "urgent": 0.9}}
    models = tmp_path / "models"
    _folder, pub = make_tiny_package(models, key_dir=tmp_path / "keys",
                                     thresholds={"review": 0.3, "urgent": 0.8, "by_backend": by_backend})
    labels = {}
    for kind in ("onnxruntime", "openvino"):
        cfg = config_mod.parse(f'[models]\ndir = "{models}"\ntrusted_keys = ["{pub}"]\n'
                               f'[inference]\nbackend = "{kind}"\n')
        outcome = Engine.load(cfg).triage_dataset(_half_bright_cr(33))  # a little over half bright: score ~0.59
        result = outcome.results[0]
        assert 0.5 < result["score"] < 0.6
        assert result["thresholds"] == by_backend[kind]
        labels[kind] = outcome.label
    assert labels == {"onnxruntime": "review", "openvino": "normal"}


@pytest.mark.parametrize("thresholds, message", [
    ({"review": 0.3, "urgent": 0.8, "by_backend": {"tensorflow": {"review": 0.3, "urgent": 0.8}}}, "tensorflow"),
    ({"review": 0.3, "urgent": 0.8, "by_backend": {"openvino": {"review": 0.9, "urgent": 0.8}}}, "by_backend"),
    ({"review": 0.3, "urgent": 0.8, "by_backend": {"openvino": {"review": 0.3}}}, "by_backend"),
    ({"review": 0.3, "urgent": 0.8, "per_site": {}}, "thresholds"),
])
def test_malformed_per_backend_thresholds_are_refused(tmp_path, thresholds, message):
    folder, pub = make_tiny_package(tmp_path, key_dir=tmp_path / "keys", thresholds=thresholds)
    with pytest.raises(ModelError, match=message):
        load_package(folder, load_trusted_keys([pub]))


# --- the same score on every CPU ------------------------------------------------------------------------------

def test_openvino_compiles_float_layers_in_f32_even_where_the_cpu_offers_bf16(package_folder, trusted):
    backend = create_backend(load_package(package_folder, trusted), "openvino", threads=1, providers=CPU)
    assert backend.precision == "f32"
    assert backend._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert create_backend(load_package(package_folder, trusted), "onnxruntime", 1, CPU).precision == "f32"


def _auto_engine(tmp_path, pub, models):
    from edge import config as config_mod
    from edge.engine import Engine

    cfg = config_mod.parse(f'[box]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{models}"\n'
                           f'trusted_keys = ["{pub}"]\n[inference]\nbackend = "auto"\n')
    return cfg, Engine.load(cfg)


def test_auto_backend_is_chosen_once_per_package_and_kept_across_restarts(tmp_path):
    from edge.engine import check_models

    models = tmp_path / "models"
    _folder, pub = make_tiny_package(models, key_dir=tmp_path / "keys")
    cfg, first = _auto_engine(tmp_path, pub, models)
    record = json.loads(cfg.backend_choice_path.read_text())
    chosen = record["tiny-cxr@1.0.0"]["backend"]
    assert first.models[0].backend.TYPE_KEY == chosen and first.describe()[0]["backend_choice"].startswith("auto, chosen")
    # A restart loads what was recorded, without timing: make the record name the other backend to prove it.
    other = "openvino" if chosen == "onnxruntime" else "onnxruntime"
    record["tiny-cxr@1.0.0"]["backend"] = other
    cfg.backend_choice_path.write_text(json.dumps(record))
    for _ in range(2):
        _cfg, again = _auto_engine(tmp_path, pub, models)
        assert again.models[0].backend.TYPE_KEY == other
        assert again.describe()[0]["backend_choice"].startswith("auto, recorded")
    assert check_models(cfg)[0][0]["backend"] == other  # what `wasla status` shows


def test_unreadable_backend_record_is_chosen_again_not_fatal(tmp_path):
    models = tmp_path / "models"
    _folder, pub = make_tiny_package(models, key_dir=tmp_path / "keys")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "backend-choice.json").write_text("{not json")
    cfg, engine = _auto_engine(tmp_path, pub, models)
    assert engine.models and "tiny-cxr@1.0.0" in json.loads(cfg.backend_choice_path.read_text())


def test_auto_times_the_backends_in_a_child_so_the_daemon_holds_only_the_winners_runtime(tmp_path):
    """Timing both in process left the loser's runtime resident (~50 MB of the daemon's peak)."""
    import subprocess
    import sys

    models = tmp_path / "models"
    _folder, pub = make_tiny_package(models, key_dir=tmp_path / "keys")
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_models_and_inference import _auto_engine
from pathlib import Path
cfg, engine = _auto_engine(Path({str(tmp_path)!r}), Path({str(pub)!r}), Path({str(models)!r}))
record = json.loads(cfg.backend_choice_path.read_text())["tiny-cxr@1.0.0"]
print(json.dumps({{"chosen": engine.models[0].backend.TYPE_KEY, "record": record,
                   "loaded": [m for m in ("onnxruntime", "openvino") if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["record"]["backend"] == got["chosen"]
    assert set(got["record"]["median_ms"]) == {"onnxruntime", "openvino"}, "both were timed (in the child)"
    assert got["loaded"] == [got["chosen"]], "only the chosen runtime is imported in the daemon's process"
