"""References to user code: `"package.module:attr"` strings, resolved the same way in every process.

What crosses a process boundary (spawned explorers, Ray actors on other nodes, the job form's
tasks) or lands in a run's `config.json` and checkpoints is never a Python object but a
reference string plus JSON keyword arguments: each process imports the module and looks the
attribute up itself (`resolve`). A callable given in Python becomes such a reference
(`reference_to`), which is refused, in one line saying what to do, where another process could
not import it: a lambda, a function defined inside another, or an object of a script run as
`python script.py` (its `__main__`, which a spawned process or a Ray node does not have).

`attr` may be dotted (`module:Class.make`); `module` is a dotted module path.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

from impala.errors import ConfigError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(rf"^({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)$")

MOVE_IT = "define it at the top level of a module that can be imported (e.g. mypkg/tools.py)"


def split(text: str) -> tuple[str, str] | None:
    """`(module, attr)` of a reference `"module:attr"`, or None if `text` is not one (a
    Gymnasium id such as `ALE/Pong-v5` or `module:Env-v0` is not: its name has `/` or `-`)."""
    match = _REFERENCE.match(text)
    return (match.group(1), match.group(2)) if match else None


def is_reference(text: object) -> bool:
    """Whether `text` is a string of the form `"module:attr"` (not whether it resolves)."""
    return isinstance(text, str) and split(text) is not None


def import_module(module: str, what: str) -> Any:
    """The module `module`, imported; ConfigError, one line naming `what` it is needed for,
    when it (or a module it imports) cannot be imported or raises while importing, or when it is
    `__main__` (the script being run, which other processes do not have)."""
    if module in ("__main__", "__mp_main__"):
        raise ConfigError(
            f"{what}: module '{module}' is the script being run, which explorer processes, Ray "
            "nodes and a checkpoint's reader cannot import; move the code into a module of its "
            "own and name that"
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name if exc.name and exc.name != module else None
        why = f"module '{missing}' is not installed" if missing else _one_line(exc)
        raise ConfigError(
            f"cannot import module '{module}' for {what}: {why} (is it on PYTHONPATH, or "
            "installed, in every process and on every node?)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(
            f"importing module '{module}' for {what} raised {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def lookup(module: Any, attr: str) -> Any:
    """`module.attr` (dotted), or a sentinel `_MISSING` if some part is missing."""
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    return obj


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def resolve(reference: str, what: str) -> Any:
    """The object `reference` (`"module:attr"`) names, imported in this process.

    `what` names its role in the one-line errors ("network 'mypkg.nets:build'"). ConfigError for
    a string that is no reference, a module that cannot be imported, a missing attribute.
    """
    parts = split(reference)
    if parts is None:
        raise ConfigError(
            f"{what}: '{reference}' is not a reference 'package.module:attr' (a dotted module "
            "path, a colon, a name in it)"
        )
    module_name, attr = parts
    module = import_module(module_name, what)
    obj = lookup(module, attr)
    if obj is _MISSING:
        raise ConfigError(f"{what}: module '{module_name}' has no attribute '{attr}'")
    return obj


def reference_to(obj: Any, what: str) -> str:
    """The reference `"module:qualname"` of a function or class `obj`, checked to resolve back to
    `obj` in a fresh process. ConfigError, one line saying what to do, for a lambda, a function
    defined inside another (a closure), a `__main__`-only object (a script's: spawned explorers,
    Ray nodes and a checkpoint's reader cannot import it), or an object that is no function or
    class (a `functools.partial`, an instance: give the function and its keyword arguments)."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not callable(obj) or not isinstance(module_name, str) or not isinstance(qualname, str):
        raise ConfigError(
            f"{what}: {_describe(obj)} cannot be given by reference; give a function or class "
            f"{MOVE_IT}, with its keyword arguments separately"
        )
    if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        raise ConfigError(
            f"{what}: a lambda cannot be imported by explorer processes, Ray nodes or a "
            f"checkpoint's reader; {MOVE_IT} and give that"
        )
    if "<locals>" in qualname:
        raise ConfigError(
            f"{what}: '{qualname}' is defined inside a function, which explorer processes, Ray "
            f"nodes and a checkpoint's reader cannot import; {MOVE_IT}"
        )
    if module_name == "__main__":
        # Run as `python -m package.module`: other processes import it by that name (as
        # multiprocessing's spawn does); not imported a second time here.
        return f"{_main_module_name(qualname, what)}:{qualname}"
    reference = f"{module_name}:{qualname}"
    try:
        found = resolve(reference, what)
    except ConfigError:
        found = _MISSING
    if found is not obj:
        raise ConfigError(
            f"{what}: '{reference}' does not import back as the object given (was it replaced "
            f"or wrapped after its definition?); {MOVE_IT} under its own name"
        )
    return reference


def _main_module_name(qualname: str, what: str) -> str:
    """The importable name of the `__main__` module that defines `obj`: a module run with
    `python -m package.module` has one (its spec's name); a script run by path has none."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name != "__main__":
        return name
    example = "mynets.py" if "net" in what else "myenvs.py"
    raise ConfigError(
        f"{what}: '{qualname}' is defined in the script being run (__main__), which explorer "
        f"processes, Ray nodes and a checkpoint's reader cannot import; move it into a module "
        f"next to the script (e.g. {example}) and import it from there"
    )


def as_reference(value: Any, what: str) -> Any:
    """`value` as it goes into a Config: a callable becomes its reference (`reference_to`);
    anything else (a name, an id, a reference string) is returned as it is."""
    if isinstance(value, str) or value is None:
        return value
    return reference_to(value, what)


def check_kwargs(kwargs: Any, flag: str) -> dict[str, Any]:
    """`kwargs` as a plain dict of JSON values (what config.json and every process can hold);
    ConfigError, one line naming `flag`, for anything else."""
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{flag} must be a JSON object of keyword arguments, got {kwargs!r}")
    bad = [key for key in kwargs if not isinstance(key, str) or not key.isidentifier()]
    if bad:
        raise ConfigError(f"{flag}: keyword argument names must be identifiers, got {bad[0]!r}")
    try:
        return json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{flag} must hold JSON values only (numbers, strings, booleans, lists, objects, "
            f"null): {_one_line(exc)}"
        ) from None


def parse_kwargs(text: str) -> dict[str, Any]:
    """The command line's `--env-kwargs '{"size": 5}'`: a JSON object. Raises ValueError (which
    argparse reports in one line) for anything else."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {_one_line(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object of keyword arguments: {text!r}")
    return value


def _describe(obj: Any) -> str:
    return f"a {type(obj).__name__} object"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
