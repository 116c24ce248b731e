"""The ONNX Runtime backend (CPU, or CUDA/TensorRT where the runtime build provides them)."""
from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from sync.core.errors import ModelError
from edge.inference.base import Backend
from edge.modelpkg import backend_relpath, read_verified

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


class OnnxRuntimeBackend(Backend):
    TYPE_KEY: ClassVar[str] = "onnxruntime"
    RUNTIME_MODULE: ClassVar[str] = "onnxruntime"

    def _load(self) -> None:
        # Absolute import: this module's own name is "onnxruntime" but it lives in edge.inference.
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        # One image at a time: parallelism between operators only costs threads on a 2-core box.
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        installed = ort.get_available_providers()
        providers = [p for p in self.providers if p in installed]
        dropped = [p for p in self.providers if p not in installed]
        if dropped:
            log.info("%s: execution providers %s are not in this runtime build (has %s)", self.name, dropped, installed)
        if CPU not in providers:
            providers.append(CPU)
        # The session is built from bytes hashed as they were read, not from a path that could change since.
        model_bytes = read_verified(self.package, backend_relpath(self.package, self.TYPE_KEY))
        try:
            session = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises pybind error types
            raise ModelError(f"{self.name}: onnxruntime cannot load the model: {err}") from err
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if self.input_name not in inputs or len(inputs) != 1:
            raise ModelError(f"{self.name}: model inputs {list(inputs)} are not the manifest's one {self.input_name!r}")
        if self.package.output_name not in outputs:
            raise ModelError(f"{self.name}: model outputs {outputs} lack the manifest's {self.package.output_name!r}")
        declared = inputs[self.input_name].shape
        if len(declared) != len(self.input_shape) or any(
                isinstance(d, int) and d != want for d, want in zip(declared, self.input_shape)):
            raise ModelError(f"{self.name}: model input shape {declared} does not fit manifest {list(self.input_shape)}")
        # ONNX Runtime's CPU provider computes float nodes in f32 on every ISA; INT8 nodes are exact integers.
        self.precision = "f32"
        self._session = session
        self._outputs = [self.package.output_name]
        log.info("%s: providers %s", self.name, session.get_providers())

    def _run(self, tensor: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {self.input_name: tensor})[0]

    def _close(self) -> None:
        self._session = None
