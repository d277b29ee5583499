"""Live catalogue reload: SIGHUP (see ``cortex.cli``) and ``POST /admin/reload``.

The model catalogue and aliases are re-read from models.toml and swapped in
whole; requests already routed keep going. A bad file keeps the old
catalogue and the reason is logged (and returned to an admin caller).
"""

from __future__ import annotations

import logging

import trio

from cortex.config import check_pins, load_models
from cortex.errors import ConfigError
from cortex.gateway.state import Catalogue, FleetState

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


def summary(catalogue: Catalogue) -> str:
    """What ``catalogue`` holds, for the log: "3 models, 2 aliases, 1 tier"."""
    counts = [
        (len(catalogue.models), "model", "models"),
        (len(catalogue.aliases), "alias", "aliases"),
        (len(catalogue.tiers), "tier", "tiers"),
    ]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)
