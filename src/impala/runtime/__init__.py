"""Runtimes: the only code that knows about processes. Each provides a batch source for the one
learner loop (`impala.loop`):

- `serial`: everything in one process, deterministic under a seed (tests, debugging);
- `local`: explorer processes and the learner, joined by lock-free shared memory (default);
- `ray_runtime`: explorers as Ray actors (`--runtime ray`);
- `jobs`: the seed's hand-started learner and explorer tasks, on Ray, across hosts.
"""
