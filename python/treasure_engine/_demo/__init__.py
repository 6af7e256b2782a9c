"""The demo (`treasure-engine demo`) and the embedded AWS endpoint it runs on (moto's server, in-process).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine._demo._demo import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
