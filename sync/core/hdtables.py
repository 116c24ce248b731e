"""highdicom's table of every DICOM module's attributes, decoded one module at a time instead of all at once.

highdicom checks each new SR or SC against the standard's module tables (`is_attribute_in_iod('ContentDate', ...)`
in every SOP instance it builds), and loads them with one `json.loads` of a 22 MB file: ~60 MB of Python objects,
kept for the life of the process, and a ~250 MB peak while decoding. In the box daemon that one call was most of its
peak memory (scripts/bench_pipeline.py: 218 -> 329 MB at the first SR). Here the file is indexed once (each
module's byte range, its objects decoded and dropped as the scan goes) and a module is decoded when highdicom
asks for it: the few modules of a CR, an SR and an SC stay cached, the text stays as one 22 MB string.

`install()` swaps the lazy table in only where highdicom's layout is the one this was written against (0.2x: the
cached `get_module_attribute_map` in `highdicom._standard_utils`, imported by name into its other modules);
anything else leaves highdicom as it is, with a log line. tests/test_hdtables.py compares the lazy table with
highdicom's own on every module.
"""
from __future__ import annotations

import json
import logging
import pkgutil
import sys
import threading
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)

RESOURCE = "_standard/module_attribute_map.json"
_lock = threading.Lock()
_table: "LazyModuleMap | None" = None


class LazyModuleMap(Mapping):
    """Read-only {module key: [attribute entries]} over the JSON text, decoding an entry on first use."""

    def __init__(self, text: str):
        self._text = text
        self._decoder = json.JSONDecoder()
        self._index = self._scan(text)
        self._cache: dict[str, list] = {}

    def _scan(self, text: str) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        raw = self._decoder.raw_decode
        pos = _skip(text, 0)
        if text[pos] != "{":
            raise ValueError("module attribute map is not a JSON object")
        pos = _skip(text, pos + 1)
        while text[pos] != "}":
            key, pos = raw(text, pos)
            pos = _skip(text, pos)
            if text[pos] != ":":
                raise ValueError(f"expected ':' at {pos}")
            start = _skip(text, pos + 1)
            _value, end = raw(text, start)  # decoded and dropped: only its extent is kept
            index[key] = (start, end)
            pos = _skip(text, end)
            if text[pos] == ",":
                pos = _skip(text, pos + 1)
        return index

    def __getitem__(self, key: str) -> list:
        got = self._cache.get(key)
        if got is None:
            start, end = self._index[key]  # KeyError, as the dict would raise
            got = self._cache[key] = self._decoder.decode(self._text[start:end])
        return got

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _skip(text: str, pos: int) -> int:
    while text[pos] in " \t\r\n":
        pos += 1
    return pos


def lazy_table() -> LazyModuleMap:
    global _table
    with _lock:
        if _table is None:
            data = pkgutil.get_data("highdicom", RESOURCE)
            if data is None:
                raise FileNotFoundError(f"highdicom {RESOURCE}")
            _table = LazyModuleMap(data.decode("utf-8"))
        return _table


def install() -> bool:
    """Point highdicom at the lazy table; True when it is in place."""
    try:
        import highdicom  # noqa: F401 - imports the submodules that bind the function by name
        from highdicom import _standard_utils as su
    except ImportError:
        return False
    original = getattr(su, "get_module_attribute_map", None)
    if getattr(original, "wasla_lazy", False):
        return True
    from importlib import resources

    if original is None or not hasattr(original, "cache_info") or \
            not resources.files("highdicom").joinpath(RESOURCE).is_file():
        log.info("highdicom layout not recognised: its module tables load whole (more memory, same results)")
        return False

    def get_module_attribute_map() -> Mapping:
        return lazy_table()

    get_module_attribute_map.wasla_lazy = True  # type: ignore[attr-defined]
    for name, module in list(sys.modules.items()):
        if (name == "highdicom" or name.startswith("highdicom.")) and \
                getattr(module, "get_module_attribute_map", None) is original:
            module.get_module_attribute_map = get_module_attribute_map  # type: ignore[attr-defined]
    return True
