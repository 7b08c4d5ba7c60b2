"""The Ray engine: `batchgen run --engine ray` runs the same job on Ray Data actors (the `ray` extra).

`driver.py` plans and drives, `actor.py` is batchgen's request engine inside each actor,
`output.py` owns the directory of part files (the checkpoint), `board.py` gathers progress.
Importing this package does not import Ray; `run_on_ray` does, and says how to install it.
"""

from batchgen.ray_engine.driver import RAY_INSTALL_HINT, run_on_ray

__all__ = ["RAY_INSTALL_HINT", "run_on_ray"]
