"""The model a command line names: ``module:function`` or ``path/to/file.py:function``.

A module is imported from the current directory first, then Python's path; a file is run as its
own module, with its folder on the path so that it can import its neighbours. Every failure is one
:class:`UsageError` that says where the import looked, never Python's raw import error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["UsageError", "load_factory", "summary"]

_SHAPE = "module:function (a module importable from the current directory) or path/to/file.py:function"


class UsageError(Exception):
    """A bad command line or argument, reported as one line with exit code 2."""


def summary(error: BaseException) -> str:
    """``RuntimeError: first line of the message``, for one-line reports of foreign errors."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def load_factory(spec: str) -> Any:
    """Call the factory ``spec`` names (with no arguments) and return the model it builds.

    ``spec`` is ``package.module:function`` or ``path/to/file.py:function``; the function may be
    dotted (``models:Zoo.small``), and a module-level ``nn.Module`` instance is returned as it is.
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"factory '{spec}' must look like {_SHAPE}")
    module, origin = _import_file(spec, where) if _is_file(where) else _import_module(spec, where)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and _own(v, module)
            )
            listed = f"; it defines {', '.join(defined[:12])}" if defined else ""
            raise UsageError(f"factory '{spec}': {origin} has no '{attr}'{listed}")
        target = getattr(target, part)
    if isinstance(target, type) or (callable(target) and not hasattr(target, "state_dict")):
        try:
            model = target()
        except SystemExit as e:  # exit code 0 would otherwise end weightport as a success, loading nothing
            raise UsageError(
                f"the factory '{spec}' exited (sys.exit({e.code!r})) instead of returning a model; nothing was "
                f"loaded. Fix: make '{attr}()' return the model without calling sys.exit (or exit())."
            ) from None
        except Exception as e:
            raise UsageError(
                f"the factory '{spec}' raised {summary(e)}. Fix: make '{attr}()' build the model "
                "with no arguments; --debug shows the traceback."
            ) from e
    else:
        model = target
    if not hasattr(model, "state_dict"):
        raise UsageError(
            f"factory '{spec}' returned a value of type {type(model).__name__}, not a torch.nn.Module. Fix: make "
            f"'{attr}' return the model."
        )
    return model


def _own(value: Any, module: ModuleType) -> bool:
    """Whether ``value`` was defined in ``module`` (not imported into it)."""
    return getattr(value, "__module__", None) == module.__name__


def _import_module(spec: str, name: str) -> tuple[ModuleType, str]:
    """Import ``name`` from the current directory first, then Python's path."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            last = name.rpartition(".")[2]
            raise UsageError(
                f"factory '{spec}': no module '{e.name}' in the current directory ({cwd}) or on Python's "
                f"path. Fix: run weightport in the folder that holds {e.name.replace('.', '/')}.py, or name "
                f"the file: path/to/{last}.py:{spec.rpartition(':')[2]}."
            ) from e
        raise UsageError(_failed(spec, _found(name), e, cwd)) from e
    except SystemExit as e:
        raise UsageError(_exited(spec, _found(name), e)) from None
    except Exception as e:
        raise UsageError(_failed(spec, _found(name), e, cwd)) from e
    finally:
        sys.path.remove(cwd)
    return module, f"'{name}' (imported from {getattr(module, '__file__', None) or 'a namespace package'})"


def _import_file(spec: str, where: str) -> tuple[ModuleType, str]:
    """Run the file ``where`` as a module named after it, its folder first on Python's path."""
    path = Path(where).expanduser()
    if not path.is_file():
        looked = path if path.is_absolute() else Path.cwd() / path
        hint = "" if where.endswith(".py") else "; a module is named without '/' (package.module:function)"
        raise UsageError(
            f"factory '{spec}': no file '{where}' (looked for {looked}){hint}. Fix: give the path of the "
            f"file that defines the factory, from the current directory or absolute."
        )
    path = path.resolve()
    name = path.stem if path.suffix == ".py" else path.name
    held = sys.modules.get(name)
    if held is not None and getattr(held, "__file__", None) != str(path):  # never shadow another module
        name = f"_weightport_factory_{name}"
    loaded = importlib.util.spec_from_file_location(name, path)
    if loaded is None or loaded.loader is None:
        raise UsageError(f"factory '{spec}': cannot import '{where}' as Python. Fix: give a .py file.")
    module = importlib.util.module_from_spec(loaded)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # classes and dataclasses in it look their module up by name
    try:
        loaded.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        if isinstance(e, SystemExit):
            raise UsageError(_exited(spec, f"'{where}' ({path})", e)) from None
        raise UsageError(_failed(spec, f"'{where}' ({path})", e, folder)) from e
    finally:
        sys.path.remove(folder)
    return module, f"'{where}' ({path})"


def _found(name: str) -> str:
    """``'name'`` with the file it was imported from, where Python can still say."""
    try:
        found = importlib.util.find_spec(name)
    except Exception:  # its package failed to import: nothing more to say
        found = None
    origin = getattr(found, "origin", None)
    return f"'{name}' ({origin})" if origin else f"'{name}'"


def _exited(spec: str, what: str, error: SystemExit) -> str:
    return (
        f"factory '{spec}': importing {what} exited (sys.exit({error.code!r})) before the factory ran; nothing "
        "was loaded. Fix: put the file's own command-line code under 'if __name__ == \"__main__\":', so that "
        "importing it only defines the factory."
    )


def _failed(spec: str, what: str, error: BaseException, first: str) -> str:
    fix = "make it import cleanly; --debug shows the traceback."
    if isinstance(error, ModuleNotFoundError):  # an import inside the factory's module
        fix = (
            f"install '{error.name}', or where it is a file of your own, run weightport where Python finds it: "
            f"imports are looked up in {first} first (a factory named as path/to/file.py:function: the "
            "file's folder), then on Python's path (PYTHONPATH); --debug shows the traceback."
        )
    return f"factory '{spec}': importing {what} raised {summary(error)}. Fix: {fix}"
