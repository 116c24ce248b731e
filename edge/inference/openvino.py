"""The OpenVINO backend (CPU; reads an IR pair or an ONNX file)."""
from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from sync.core.errors import ModelError
from edge.inference.base import Backend
from edge.modelpkg import backend_relpath, read_verified


# oneDNN (inside OpenVINO's CPU plugin) is capped below AMX: on AMX CPUs its int8 kernels round differently, and
# the 1.2.0 package's scores moved by up to 0.042 against the same model on AVX2, AVX-512 or AVX-512 VNNI, which
# all agree to the last bit. With the cap every x86 box computes what an AVX2 box computes. An operator's own
# ONEDNN_MAX_CPU_ISA wins (tests use it to exercise lower ISAs).
MAX_ISA = "AVX512_CORE_VNNI"


def pin_isa() -> str:
    """Cap oneDNN's ISA for this process (read at the first compile, so call before compiling); return the cap."""
    return os.environ.setdefault("ONEDNN_MAX_CPU_ISA", MAX_ISA)


def type_name(value) -> str:
    """"f32" for ov.Type.f32 (whose str() is "<Type: 'float32'>"), the plain string for anything else."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenVinoBackend(Backend):
    """Compiled for "CPU"; `providers` (an ONNX Runtime notion) does not apply and is ignored."""

    TYPE_KEY: ClassVar[str] = "openvino"
    RUNTIME_MODULE: ClassVar[str] = "openvino"

    def _load(self) -> None:
        # Absolute import: this module's own name is "openvino" but it lives in edge.inference.
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        rel = backend_relpath(self.package, self.TYPE_KEY)
        # Read from bytes hashed as they were read, so the runtime sees exactly what was signed.
        model_bytes = read_verified(self.package, rel)
        weights = read_verified(self.package, rel[:-4] + ".bin") if rel.endswith(".xml") else b""
        # f32 pinned: on CPUs with AVX-512 BF16 or AMX OpenVINO would otherwise run the float layers (stem,
        # classifier, dequantised edges) in bf16, and a threshold calibrated on one CPU would move on the next.
        config = {props.inference_num_threads(): self.threads,
                  hints.performance_mode(): hints.PerformanceMode.LATENCY,
                  hints.inference_precision(): ov.Type.f32}
        self.isa_cap = pin_isa()
        try:
            core = ov.Core()
            model = core.read_model(model=model_bytes, weights=weights)
            compiled = core.compile_model(model, "CPU", config)
        except Exception as err:  # openvino raises RuntimeError and pybind types
            raise ModelError(f"{self.name}: openvino cannot load the model: {err}") from err
        input_names = [n for port in compiled.inputs for n in port.get_names()]
        if self.input_name not in input_names or len(compiled.inputs) != 1:
            raise ModelError(f"{self.name}: model inputs {input_names} are not the manifest's one {self.input_name!r}")
        try:
            self._output = compiled.output(self.package.output_name)
        except RuntimeError as err:
            raise ModelError(f"{self.name}: model has no output {self.package.output_name!r}") from err
        pshape = compiled.input(self.input_name).get_partial_shape()
        if not pshape.compatible(ov.PartialShape(list(self.input_shape))):
            raise ModelError(f"{self.name}: model input shape {pshape} does not fit manifest {list(self.input_shape)}")
        precision = type_name(compiled.get_property(hints.inference_precision()))
        if precision != "f32":
            raise ModelError(f"{self.name}: compiled with inference precision {precision}, not the f32 asked for")
        self.precision = precision
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def _run(self, tensor: np.ndarray) -> np.ndarray:
        result = self._request.infer({self.input_name: tensor})
        # The request reuses its output buffer on the next call; copy before handing the array out.
        return np.array(result[self._output], copy=True)

    def _close(self) -> None:
        self._request = None
        self._compiled = None
