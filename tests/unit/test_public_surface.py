"""A snapshot of the public surface: the names in `treasure_engine.__all__` and, for classes, their public
methods and attributes with signatures. It fails on any change; a change on purpose updates the snapshot
(`python tests/unit/test_public_surface.py --update`) and says so in CHANGELOG.md.

Module paths are not part of it: every submodule is private (`treasure_engine.__all__` is the surface), and
the moves of issue #17 are listed in CHANGELOG.md."""

from __future__ import annotations

import enum
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import treasure_engine

SNAPSHOT = Path(__file__).with_name("public_surface.json")


def _signature(obj: Any) -> str:
    """The signature, with the names of the package's types as the user writes them (`treasure_engine.X`, not
    the private module that defines X)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return _unqualified(text)


def _unqualified(text: str) -> str:
    return re.sub(r"\btreasure_engine(?:\.\w+)*\.([A-Za-z_]\w*)", r"\1", text)


def _ours(cls: type) -> list[type]:
    """The classes of `cls`'s MRO that the package defines (not object, Exception, enum.Enum, ...)."""
    return [k for k in cls.__mro__ if k.__module__.startswith("treasure_engine")]


def _member(cls: type, name: str) -> str:
    raw = next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__)
    if isinstance(raw, property):
        return "property"
    if isinstance(raw, classmethod | staticmethod):
        return f"{type(raw).__name__}{_signature(getattr(cls, name))}"
    if inspect.isfunction(raw) or inspect.ismethoddescriptor(raw) or inspect.isbuiltin(raw):
        return f"method{_signature(raw)}"
    if inspect.isdatadescriptor(raw):
        return "attribute"
    if isinstance(cls, enum.EnumMeta) and isinstance(getattr(cls, name), cls):
        return f"member {getattr(cls, name).value!r}"
    return f"attribute {type(raw).__name__}"


def _class(cls: type) -> dict[str, Any]:
    names = sorted({n for k in _ours(cls) for n in k.__dict__ if not n.startswith("_")})
    annotations = sorted({n for k in _ours(cls) for n in getattr(k, "__annotations__", {}) if not n.startswith("_")})
    bases = [b.__name__ for b in cls.__mro__[1:] if b is not object]
    return {
        "kind": "class",
        "bases": bases,
        "init": _signature(cls),
        "members": {n: _member(cls, n) for n in names},
        "annotated": annotations,
    }


def surface() -> dict[str, Any]:
    """What `treasure_engine` offers, name by name."""
    out: dict[str, Any] = {}
    for name in sorted(treasure_engine.__all__):
        obj = getattr(treasure_engine, name)
        if name == "__version__":
            out[name] = {"kind": "str"}
        elif inspect.isclass(obj):
            out[name] = _class(obj)
        elif callable(obj) and not hasattr(obj, "__origin__"):
            out[name] = {"kind": "function", "signature": _signature(obj)}
        else:
            out[name] = {
                "kind": "value",
                "type": type(obj).__name__,
                "repr": _unqualified(repr(obj)) if name[0].isupper() else "",
            }
    return out


def test_the_public_surface_is_the_snapshot() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    current = json.loads(json.dumps(surface()))
    changed = sorted(k for k in set(expected) | set(current) if expected.get(k) != current.get(k))
    assert not changed, (
        f"the public surface changed: {changed}. If on purpose, run `python {Path(__file__).name} --update` "
        "and list the change in CHANGELOG.md"
    )


def test_every_public_name_lives_in_a_private_module_or_subpackage() -> None:
    """The objects behind `__all__` are defined under `treasure_engine` (submodules are private; importing
    them by their module path is not the API)."""
    for name in treasure_engine.__all__:
        obj = getattr(treasure_engine, name)
        module = getattr(obj, "__module__", None)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert module is not None
            assert module.startswith("treasure_engine"), (name, module)


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    SNAPSHOT.write_text(json.dumps(surface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
