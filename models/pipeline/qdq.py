"""FP32 weights recovered from a package's INT8 QDQ graph: for benchmarks, and to adapt a package without its checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sync.core.errors import ModelError

log = logging.getLogger(__name__)


def fp32_from_qdq(src: Path, dst: Path) -> None:
    """Rebuild an FP32 graph from a QDQ one: weights dequantised, activation Q/DQ pairs dropped, and the ReLU6
    clamps the quantiser folded into unsigned ranges put back as Clip. Same graph and FP32 cost as the export;
    the weights carry the INT8 rounding."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    producers = {o: n for n in g.node for o in n.output}
    rename, clamps, new_inits, drop = {}, {}, [], set()
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            drop.add(id(n))
            zp = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else np.uint8(0)
            producer = producers.get(n.input[0])
            # a convolution whose output range starts at 0 had its ReLU6 folded away (pooling after it is merely
            # non-negative, and clamping there would add a limit the FP32 graph does not have)
            if zp.dtype == np.uint8 and int(zp) == 0 and producer is not None and producer.op_type == "Conv":
                clamps[n.input[0]] = 255.0 * float(arr(n.input[1]))
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        drop.add(id(n))
        if n.input[0] in inits:
            q = arr(n.input[0]).astype(np.float64)
            s = arr(n.input[1]).astype(np.float64)
            z = arr(n.input[2]).astype(np.float64) if len(n.input) > 2 and n.input[2] else np.float64(0)
            if s.ndim == 1 and q.ndim > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * q.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), (z.reshape(shape) if z.ndim else z)
            new_inits.append(numpy_helper.from_array(((q - z) * s).astype(np.float32), n.output[0]))
        else:
            producer = producers.get(n.input[0])
            if producer is None or producer.op_type != "QuantizeLinear":
                raise ModelError(f"{src.name}: DequantizeLinear {n.name!r} is fed by neither a weight nor a Q node")
            x = producer.input[0]
            rename[n.output[0]] = x + "_clamped" if x in clamps else x
    nodes = []

    def add_clamp(x: str) -> None:
        lo, hi = x + "_lo", x + "_hi"
        new_inits.extend([numpy_helper.from_array(np.array(0.0, np.float32), lo),
                          numpy_helper.from_array(np.array(clamps[x], np.float32), hi)])
        nodes.append(helper.make_node("Clip", [x, lo, hi], [x + "_clamped"]))

    for i in g.input:
        if i.name in clamps:
            add_clamp(i.name)
    for n in g.node:
        if id(n) in drop:
            continue
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
        nodes.append(n)
        for o in n.output:
            if o in clamps:
                add_clamp(o)
    for o in g.output:
        if o.name in rename:
            nodes.append(helper.make_node("Identity", [rename[o.name]], [o.name]))
    used = {i for n in nodes for i in n.input}
    keep = [i for i in list(g.initializer) + new_inits if i.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))


# EfficientNet-Lite: the batch norm each convolution feeds (the export folds it into the convolution's bias).
_BN_OF = {"_conv_stem": "_bn0", "_conv_head": "_bn1", "_expand_conv": "_bn0", "_depthwise_conv": "_bn1",
          "_project_conv": "_bn2"}


def _bn_name(conv: str) -> str:
    head, _, leaf = conv.rpartition(".")
    return (head + "." if head else "") + _BN_OF[leaf]


def torch_from_qdq(onnx_path: Path, num_classes: int, image_size: int, scratch: Path, arch: str | None = None):
    """An EfficientNet-Lite (`arch`, default Lite0) torch model carrying the QDQ graph's weights. Batch norm was folded into each
    convolution by the export, so every BN becomes identity-plus-bias (mean 0, var 1 - eps, scale 1): the model
    must be fine-tuned with its BN layers in eval mode (meta "bn_folded")."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from models.pipeline.model import build_model

    fp32 = scratch / "from-package.fp32.onnx"
    fp32_from_qdq(onnx_path, fp32)
    graph = onnx.load(str(fp32)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = build_model(num_classes, image_size, pretrained=False, **({"arch": arch} if arch else {}))
    modules = dict(model.named_modules())
    convs = {name for name, mod in modules.items() if isinstance(mod, torch.nn.Conv2d)}
    state, seen = {}, set()
    for node in graph.node:
        if node.op_type == "Conv":
            name = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            if name not in convs:
                raise ModelError(f"{onnx_path.name}: convolution {node.name!r} has no counterpart in {arch or 'efficientnet-lite0'}")
            conv, bn = modules[name], modules[_bn_name(name)]
            w = weights[node.input[1]]
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ModelError(f"{onnx_path.name}: {name} weight {w.shape} != {tuple(conv.weight.shape)}")
            b = weights[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
            bn_name = _bn_name(name)
            state[name + ".weight"] = torch.from_numpy(w.copy())
            state[bn_name + ".weight"] = torch.ones(w.shape[0])
            state[bn_name + ".bias"] = torch.from_numpy(b.astype(np.float32).copy())
            state[bn_name + ".running_mean"] = torch.zeros(w.shape[0])
            state[bn_name + ".running_var"] = torch.full((w.shape[0],), 1.0 - bn.eps)
            seen.add(name)
        elif node.op_type in ("Gemm", "MatMul"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                raise ModelError(f"{onnx_path.name}: classifier {node.name!r} is not a plain x @ W + b")
            if node.input[1] not in weights:
                raise ModelError(f"{onnx_path.name}: classifier {node.name!r} has no constant weight")
            w = weights[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            if tuple(w.shape) != tuple(model._fc.weight.shape):
                raise ModelError(f"{onnx_path.name}: classifier {w.shape} != {tuple(model._fc.weight.shape)}")
            bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            state["_fc.weight"] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
            state["_fc.bias"] = torch.from_numpy(np.array(bias if bias is not None else np.zeros(w.shape[0]),
                                                          dtype=np.float32, copy=True))
            seen.add("_fc")
    missing = sorted(convs - seen) + ([] if "_fc" in seen else ["_fc"])
    if missing:
        raise ModelError(f"{onnx_path.name}: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model
