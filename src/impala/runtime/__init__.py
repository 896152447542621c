"""Runtimes: the only code that knows about processes.

- `serial`: everything in one process, deterministic under a seed (tests, debugging);
- `local`: explorer processes and a learner exchanging unrolls through shared memory (default).
"""

from impala.runtime.common import Runtime

__all__ = ["Runtime"]
