"""Live reload: SIGHUP (see ``cortex.cli``) and ``POST /admin/reload``.

The model catalogue and aliases are re-read from models.toml and swapped in
whole, and so are the API keys when ``[gateway] api_keys_file`` names a
file (``api_keys`` in cortex.toml are read at start only, with the rest of
cortex.toml); requests already routed keep going. A bad file keeps the old
catalogue and the old keys (both: a reload is all or nothing) and the
reason is logged (and returned to an admin caller). A keys file with no
key in it is bad: a file cut short would otherwise drop its keys (and
open a gateway that has no others).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from cortex.config import check_pins, load_models, read_api_keys
from cortex.errors import ConfigError
from cortex.gateway.state import Catalogue, FleetState

if TYPE_CHECKING:
    from cortex.gateway.context import Gateway

log = logging.getLogger(__name__)


async def reload_catalogue(state: FleetState, path: str) -> Catalogue:
    """Read ``path`` and make it the catalogue.

    Raises:
      ConfigError: the file is bad; the old catalogue stays.
    """
    try:
        models = await trio.to_thread.run_sync(load_models, path)
        check_pins(models, state.neurons, source=path)
    except ConfigError as exc:
        log.error("reload failed, keeping the old catalogue: %s", exc.message)
        raise
    state.replace_catalogue(Catalogue.from_file(models))
    log.info("reloaded %s: %s", path, summary(state.catalogue))
    return state.catalogue


async def reload_gateway(gateway: Gateway) -> Catalogue:
    """Re-read the gateway's models.toml (``--models``) and its ``api_keys_file``.

    Either may be missing (nothing of it to re-read); the caller says
    something when both are.

    Raises:
      ConfigError: a file is bad; the old catalogue and keys stay.
    """
    section = gateway.config.gateway
    keys = None
    if section.api_keys_file:
        try:
            keys = await trio.to_thread.run_sync(read_api_keys, section)
        except ConfigError as exc:
            log.error("reload failed, keeping the old catalogue and keys: %s", exc.message)
            raise
    catalogue = gateway.state.catalogue
    if gateway.models_path is not None:
        catalogue = await reload_catalogue(gateway.state, gateway.models_path)
    if keys is not None:
        gateway.api_keys = keys
        log.info("reloaded %s: %d API key(s)", section.api_keys_file, len(keys))
    return catalogue


def summary(catalogue: Catalogue) -> str:
    """What ``catalogue`` holds, for the log: "3 models, 2 aliases, 1 tier"."""
    counts = [
        (len(catalogue.models), "model", "models"),
        (len(catalogue.aliases), "alias", "aliases"),
        (len(catalogue.tiers), "tier", "tiers"),
    ]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)
