"""Store backends by name: built-ins, ``register_store`` and the ``explaind.stores`` entry points."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar

from ..errors import StoreError
from .base import Store

__all__ = ["register_store", "open_store", "available_schemes", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "explaind.stores"
_SCHEMES: dict[str, type[Store]] = {}
_entry_points_loaded = False

S = TypeVar("S", bound=type[Store])


def register_store(scheme: str) -> Callable[[S], S]:
    """Class decorator registering a ``Store`` subclass under ``scheme`` (``scheme://...``).

    The class is constructed as ``cls(location, readonly=...)``.
    """
    if not scheme or not scheme.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"store scheme {scheme!r} must be a non-empty alphanumeric name")

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Store)):
            raise TypeError(f"register_store({scheme!r}) needs a Store subclass, got {cls!r}")
        _SCHEMES[scheme] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _SCHEMES:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not break the built-in stores
            logger.warning("store entry point %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if isinstance(cls, type) and issubclass(cls, Store):
            _SCHEMES[ep.name] = cls
        else:
            logger.warning("store entry point %r does not name a Store subclass", ep.name)


def available_schemes() -> list[str]:
    """Installed store schemes, sorted."""
    _load_entry_points()
    return sorted(_SCHEMES)


def _lookup(scheme: str) -> type[Store]:
    if scheme not in _SCHEMES:
        _load_entry_points()
    try:
        return _SCHEMES[scheme]
    except KeyError:
        raise StoreError(
            f"no store backend is registered for scheme {scheme!r}; installed schemes: "
            f"{', '.join(available_schemes())}. Register one with "
            f"@explaind_trace.register_store({scheme!r}) or an {ENTRY_POINT_GROUP!r} entry point."
        ) from None


def open_store(spec: Store | str | os.PathLike[str], *, readonly: bool) -> Store:
    """Open a store from an instance, a URL ``scheme://location`` or a plain path (LMDB).

    An instance is returned as is (its ``readonly`` flag must allow the requested access).
    """
    if isinstance(spec, Store):
        if not readonly and spec.readonly:
            raise StoreError(f"{spec!r} is read-only; pass a writable store to record into.")
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise StoreError(
            f"a store is given as a Store instance, a URL like 'lmdb://path' or a path; got {spec!r}"
        )
    if "://" in spec:
        scheme, location = spec.split("://", 1)
    else:
        scheme, location = "lmdb", str(Path(spec))
    cls = _lookup(scheme)
    return cls(location, readonly=readonly)
