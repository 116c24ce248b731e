"""Loads the active, verified model packages once and runs them on instances: decode → route → infer → triage."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from edge import imaging, modelpkg, modelpolicy, routing, triage
from sync.wire import limits
from sync.wire import dicom_scan
from edge.config import Config
from sync.core.errors import BadInputError, ModelError, WaslaError
from edge.inference import create_recorded, read_choices

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    package: modelpkg.ModelPackage
    backend: object
    spec: imaging.InputSpec


@dataclass
class Outcome:
    label: str | None
    reasons: list[dict]
    results: list[dict]
    timings: dict[str, float] = field(default_factory=dict)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class Engine:
    """Holds the loaded models; `triage_file` is pure with respect to the store, so benchmarks can call it directly."""

    def __init__(self, cfg: Config, models: list[LoadedModel], errors: list[str] | None = None):
        self.cfg = cfg
        self.models = models
        self.load_errors = errors or []

    @classmethod
    def load(cls, cfg: Config) -> "Engine":
        """Load every active package that verifies; a refused package is reported, never half-loaded."""
        trusted = modelpkg.load_trusted_keys(cfg.models.trusted_keys) if cfg.models.trusted_keys else {}
        loaded, errors = [], []
        try:
            policy = modelpolicy.load(cfg.models.dir, trusted)
        except WaslaError as err:
            # A policy that does not verify is tampering: fail closed (every study to a person), never open.
            log.error("model policy refused: %s; no model is loaded", err)
            return cls(cfg, [], [f"model policy: {err}"])
        for active in modelpkg.active_folders(cfg.models.dir):
            # A refused active version (tampered, half-copied) must not leave the clinic without triage: fall back
            # to the newest installed version that verifies, and say so loudly.
            others = [active.parent / v for v in reversed(modelpkg.versions(cfg.models.dir, active.parent.name))
                      if v != active.name]
            for folder in [active, *others]:
                try:
                    pkg = modelpkg.load_package(folder, trusted)
                    policy.check(pkg.name, pkg.version)  # revoked or below the floor: the next version is tried
                    # create_backend loads and warms up; the first real study then pays no JIT/allocation cost.
                    backend = create_recorded(pkg, cfg.inference.backend, cfg.inference.threads,
                                              cfg.inference.providers, cfg.inference.warmup,
                                              cfg.backend_choice_path, cfg.models.trusted_keys)
                except WaslaError as err:
                    errors.append(f"{folder}: {err}")
                    log.error("model package %s refused: %s", folder, err)
                    continue
                loaded.append(LoadedModel(pkg, backend, imaging.InputSpec.from_manifest(pkg.input_spec)))
                if folder != active:
                    log.error("active model %s refused; running fallback version %s", active, pkg.version)
                log.info("model %s %s loaded on %s", pkg.name, pkg.version, backend.name)
                break
        if not loaded:
            log.warning("no model loaded: every study will be flagged 'review' with reason no_model")
        return cls(cfg, loaded, errors)

    def triage_file(self, path: Path) -> Outcome:
        t = {}
        t0 = time.perf_counter()
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # pydicom raises many types for broken files
            # pydicom's own words can quote a header value (a patient's name): the reason names the kind only.
            raise BadInputError(f"cannot read DICOM: {dicom_scan.reason(err, 'file')}") from err
        t["read_ms"] = _ms(t0)
        return self.triage_dataset(ds, t)

    def triage_dataset(self, ds: pydicom.Dataset, t: dict | None = None) -> Outcome:
        t = {} if t is None else t
        if limits.is_non_image(ds.get("SOPClassUID")):
            # No label: the study's label comes from its images; the object still travels with the study.
            return Outcome(None, [{"code": "not_an_image"}], [], t)
        attrs = routing.instance_attrs(ds)
        chosen = [m for m in self.models if m.package in routing.select_models(attrs, [m.package for m in self.models])]
        if not chosen:
            if not self.models:
                return Outcome(triage.NO_MODEL.label, list(triage.NO_MODEL.reasons), [], t)
            # Models are installed, none is meant for this image (an ultrasound on a chest X-ray box): say that.
            modality = attrs.get("Modality", "")[:16]
            return Outcome("review", [{"code": "no_matching_model", "modality": modality or "?"}], [], t)
        limits.check_header(ds, self.cfg.storage.max_pixels)
        rendered: dict[str, list[np.ndarray]] = {}
        results, labels, reasons = [], [], []
        for m in chosen:
            t0 = time.perf_counter()
            key = f"{m.spec.frames}:{min(m.spec.shape[2:])}"
            if key not in rendered:
                rendered[key] = imaging.render(ds, min_side=min(m.spec.shape[2:]), frames=m.spec.frames,
                                               max_pixels=self.cfg.storage.max_pixels)
            t["decode_ms"] = t.get("decode_ms", 0) + _ms(t0)
            frames = rendered[key]
            t0 = time.perf_counter()
            tensors = [imaging.to_tensor(f, m.spec) for f in frames]
            t["preprocess_ms"] = t.get("preprocess_ms", 0) + _ms(t0)
            t0 = time.perf_counter()
            probs = [np.asarray(m.backend.predict(x), dtype=np.float64) for x in tensors]
            kind = getattr(m.backend, "TYPE_KEY", None)
            t["infer_ms"] = t.get("infer_ms", 0) + _ms(t0)
            # Several frames (cine loop): the most abnormal frame decides, a missed finding costs more than a review.
            decisions = [triage.decide(p, m.package, kind) for p in probs]
            worst = max(range(len(decisions)), key=lambda i: (triage.severity(decisions[i].label), decisions[i].score or 0))
            d = decisions[worst]
            labels.append(d.label)
            reasons.extend(d.reasons)
            results.append({
                "model": m.package.name, "model_version": m.package.version, "backend": m.backend.name,
                "scores": dict(zip(m.package.labels, [round(float(v), 6) for v in probs[worst]])),
                "score": d.score, "thresholds": asdict(m.package.thresholds_for(kind)),
                "label": d.label,
                "reasons": d.reasons, "frames": len(frames), "timings": dict(t),
            })
        return Outcome(triage.most_severe(labels), reasons, results, t)

    def describe(self) -> list[dict]:
        return [{"name": m.package.name, "version": m.package.version, "backend": m.backend.name,
                 "precision": m.backend.precision, "backend_choice": m.backend.choice,
                 "key_id": m.package.key_id} for m in self.models]


def check_models(cfg: Config) -> tuple[list[dict], list[str]]:
    """Verify packages without loading a runtime (for `wasla status` / `doctor`)."""
    trusted = modelpkg.load_trusted_keys(cfg.models.trusted_keys) if cfg.models.trusted_keys else {}
    ok, bad = [], []
    choices = read_choices(cfg.backend_choice_path) if cfg.inference.backend == "auto" else {}
    for folder in modelpkg.active_folders(cfg.models.dir):
        try:
            pkg = modelpkg.load_package(folder, trusted)
            recorded = choices.get(pkg.id) if isinstance(choices.get(pkg.id), dict) else {}
            backend = (cfg.inference.backend if cfg.inference.backend != "auto"
                       else recorded.get("backend", "auto"))
            ok.append({"name": pkg.name, "version": pkg.version, "key_id": pkg.key_id, "backend": backend,
                       "backend_chosen_at": recorded.get("chosen_at")})
        except (ModelError, WaslaError) as err:
            bad.append(f"{folder}: {err}")
    return ok, bad
