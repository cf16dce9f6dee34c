"""A stricter stand-in for NDIF than nnsight's ``remote="local"``, for the remote-path tests.

nnsight's local simulation serialises a trace as a remote request would, deserialises it,
and then runs the *original* block in the caller's own frame. A server runs the
*deserialised* block on copies of everything it references and sends back only the
variables the block saved; a value the block writes into a container from outside the
trace never comes back. :func:`server_like` runs the deserialised block as a server would
and hands back only what it saved, so a test that passes under it does not rely on
sharing objects with the caller.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import linecache
import sys
from typing import Iterator

import pytest


def _run_like_a_server(self, tracer) -> None:
    from nnsight.ndif import pull_env
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves
    from nnsight.tracing.util import push

    pull_env()
    blob = RequestModel.serialize(tracer, compress=False)
    # deserialize() puts the block's source into linecache under its file's name, which on a
    # server is harmless; here it would hide the real file from later serialisations.
    filename = tracer.info.frame.f_code.co_filename
    kept = linecache.cache.get(filename)
    try:
        with _without_package("rephelpers"):
            restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects(), compress=False)
    finally:
        if kept is None:
            linecache.cache.pop(filename, None)
        else:
            linecache.cache[filename] = kept
    restored.execute(restored.info.code)
    # What the server sends back: the block's variables that it saved, nothing else.
    saved = _saves()
    push(tracer.info.frame, {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saved})


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name, path=None, target=None):
        if name == self.package or name.startswith(self.package + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the server)", name=name)
        return None


@contextlib.contextmanager
def _without_package(package: str) -> Iterator[None]:
    """As on a server that lacks ``package``: its modules are gone and cannot be imported."""
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
              if name == package or name.startswith(package + ".")}
    blocker = _Refuse(package)
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


@contextlib.contextmanager
def server_like(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, ``remote="local"`` traces run as on a server (see the module docstring)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    monkeypatch.setattr(LocalSimulationBackend, "__call__", _run_like_a_server)
    yield
