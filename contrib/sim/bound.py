"""Lower bounds on a trace's cold loads: ``python -m cortex.sim.bound``, from a checkout.

``python3 contrib/sim/bound.py --fleet contrib/sim/fleet.toml TRACE.jsonl ...``

The program lives in ``cortex/sim/bound.py`` (its docstring says what each
bound means); this runs it without installing cortex. Needs scipy.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from cortex.sim.bound import main

if __name__ == "__main__":
    sys.exit(main())
