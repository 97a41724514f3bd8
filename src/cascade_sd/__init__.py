"""cascade-sd: relaxed speculative decoding of autoregressive image generators."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Margin over the core count above which the machine counts as busy: the 1-minute load average also
# holds this workflow's own previous job (its threads) and Snakemake itself.
BUSY_MARGIN = 1.5


def omp_wait_policy(environ: dict[str, str] | None = None, load: float | None = None,
                    cores: int | None = None) -> str | None:
    """The OpenMP wait policy this process should use, or None to keep OpenMP's default.

    torch's CPU threads spin-wait at every parallel region's barrier; when other processes keep the
    cores busy, a spinning thread burns the time slice its partner needs. Under 2 normal + 6 niced busy
    processes on 2 cores, tokenising took 49–62 s with OpenMP's default (7–8 s quiet; 50–62 CPU-s) and
    17–23 s with PASSIVE, about its fair CPU share. PASSIVE costs a quiet machine ~25% (9–10 s), so it
    is chosen only when the 1-minute load average is well over the cores; a user's own OMP_WAIT_POLICY
    always wins. It must be set before torch is imported (libgomp reads it once); the wait policy
    never changes results.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform: keep OpenMP's default
            return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "PASSIVE" if load > cores + BUSY_MARGIN else None


_policy = omp_wait_policy()
if _policy is not None:
    os.environ["OMP_WAIT_POLICY"] = _policy
