"""Which model packages apply to a DICOM instance, by the routing rules in their manifests."""
from __future__ import annotations

from typing import Any

from pydicom.multival import MultiValue

from edge.modelmanifest import ROUTING_KEYS, ModelPackage


def instance_attrs(ds: Any) -> dict[str, str]:
    """The routing attributes of a pydicom dataset (header only is enough); missing ones are ""."""
    attrs = {}
    for key in ROUTING_KEYS:
        value = ds.get(key, None)
        if value is None:
            attrs[key] = ""
        elif isinstance(value, (list, tuple, MultiValue)):
            attrs[key] = "\\".join(str(v).strip() for v in value)
        else:
            attrs[key] = str(value).strip()
    return attrs


def rule_matches(rule: dict[str, tuple[str, ...]] | dict[str, list[str]], attrs: dict[str, str]) -> bool:
    """Every key in the rule must match; a key absent from the rule matches anything; "" matches missing/empty."""
    for key, allowed in rule.items():
        value = _norm(attrs.get(key))
        if value not in {_norm(a) for a in allowed}:
            return False
    return True


def select_models(attrs: dict[str, str], packages: list[ModelPackage]) -> list[ModelPackage]:
    """The packages with at least one routing rule matching `attrs`, in the order given."""
    return [pkg for pkg in packages if any(rule_matches(rule, attrs) for rule in pkg.routing)]


def _norm(value: str | None) -> str:
    # DICOM pads strings with spaces and is inconsistent about case in practice ("Chest", "CHEST").
    return (value or "").strip().upper()
