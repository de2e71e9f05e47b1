"""The fake Kubernetes API server of the provider tests: the rehearsal's (rehearsal/apiserver.py).

It moved out of tests/ because `make rehearse` runs the whole chart against it; the tests keep this name.
"""

from rehearsal.apiserver import FakeApiServer

__all__ = ["FakeApiServer"]
