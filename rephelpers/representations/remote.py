"""Hosted models through nnsight's remote execution (NDIF).

``load_model(model_id, remote=True)`` gives a :class:`~rephelpers.representations.models.Model`
whose weights stay on the NDIF servers (https://ndif.us): locally there is only a
weightless ("meta") copy of the architecture, for names and shapes, and every trace the
stages open is serialised and run remotely, with the same
:class:`~rephelpers.interventions.intervene.Intervention` objects a local model gets. Their
classes are shipped by value (:func:`ship_package`), since the servers do not have this
package.

:func:`check_ndif` runs before anything else is done with such a model, and refuses with
a message that says what to do when the API key is missing, the service cannot be
reached, or the model is not being served. ``remote="local"`` is nnsight's simulation of
a remote run: each trace is serialised exactly as for NDIF, deserialised, and run on
weights loaded here, which checks offline that a run can ship.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from ..errors import RephelpersError, require

REMOTE_MODES = (False, True, "local")
_TIMEOUT_S = 10.0


def check_remote_mode(remote: Any) -> bool | str:
    """``remote`` as one of :data:`REMOTE_MODES`, or a clear error."""
    require(
        remote is False or remote is True or remote == "local",
        f"remote={remote!r}: use False (run here), True (run on NDIF) or 'local' (simulate a remote run here).",
    )
    return remote


def api_host() -> str:
    """The NDIF service address nnsight uses (``NDIF_HOST`` or nnsight's configured default)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_HOST") or CONFIG.API.HOST


def api_key() -> str | None:
    """The NDIF API key nnsight sends (``NDIF_API_KEY`` or one saved with ``nnsight login``)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def _get(path: str, key: str | None) -> Any:
    import httpx

    headers = {"ndif-api-key": key} if key else None
    response = httpx.get(f"{api_host().rstrip('/')}{path}", headers=headers, timeout=_TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def check_ndif(model_id: str) -> None:
    """Refuse a remote run of ``model_id`` that cannot work, before any work is done.

    In order: an API key must be set (``NDIF_API_KEY``, or ``nnsight login``); the service
    at :func:`api_host` must answer (``/status``, 10 s); ``model_id`` must be among the
    models it is running. A key the service does not recognise (``/whoami`` names no
    account) is a warning only, since a self-hosted service may not check keys.
    """
    key = api_key()
    require(
        key is not None,
        f"remote=True runs {model_id!r} on NDIF, which needs an API key, and none is set. Get one at "
        "https://login.ndif.us, then `export NDIF_API_KEY=<your key>` (or run `nnsight login` once), "
        "or set remote=False to run a model you have locally.",
    )
    import httpx

    host = api_host()
    try:
        status = _get("/status", key)
    except (httpx.HTTPError, ValueError) as err:
        raise RephelpersError(
            f"remote=True needs the NDIF service at {host}, and it did not answer ({err.__class__.__name__}: {err}). "
            "Check the network (remote execution cannot run offline), the service's status at https://ndif.us, "
            "or NDIF_HOST if you use another server; or set remote=False to run locally."
        ) from err
    try:
        identity = _get("/whoami", key)
    except (httpx.HTTPError, ValueError):
        identity = None  # an older service without /whoami: the key is checked with the first request
    if isinstance(identity, dict) and not identity.get("email"):
        warnings.warn(f"NDIF at {host} does not recognise the API key in use; requests may be refused.", stacklevel=2)
    running = sorted({
        d.get("repo_id") for d in (status.get("deployments") or {}).values()
        if isinstance(d, dict) and d.get("application_state") == "RUNNING" and d.get("repo_id")
    })
    require(
        model_id in running,
        f"NDIF at {host} is not running {model_id!r} now. Models it is running: "
        f"{', '.join(running[:20]) or 'none'}{' …' if len(running) > 20 else ''}. Pick one of those, or set remote=False.",
    )


def ship_package() -> None:
    """Have nnsight ship this package's code by value with every remote request (the
    servers do not have it installed): interventions are instances of its classes."""
    import nnsight

    nnsight.register(__name__.split(".")[0])
