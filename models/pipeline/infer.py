"""Batch-1 inference with ONNX Runtime and OpenVINO, fed exactly like the box feeds its models."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sync.core.errors import InferenceError, NotFoundError
from models.pipeline.data import normalise

log = logging.getLogger(__name__)


class OrtRunner:
    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise NotFoundError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoRunner:
    def __init__(self, path: Path, threads: int = 2, precision: str | None = "f32"):
        """`precision` f32 by default, as the box pins it: calibration on a bf16 CPU must not shift thresholds."""
        import openvino as ov

        if not Path(path).is_file():
            raise NotFoundError(f"OpenVINO model {path} does not exist")
        from edge.inference.openvino import pin_isa, type_name

        self.isa_cap = pin_isa()  # as the box does: AMX int8 kernels would give other scores
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[self.compiled.output(0)])


def logits_for(runner, images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """Run every (H, W) uint8 image one at a time (the models have a static batch of 1)."""
    out = []
    for image in images:
        logits = runner(normalise(image, mean, std)[None])
        if not np.all(np.isfinite(logits)):
            raise InferenceError("model produced non-finite logits")
        out.append(logits[0])
    return np.asarray(out, dtype=np.float32)
