"""One BLAS thread for the rollout statistics, in the processes that compute them.

The look data are sums over rows (``np.dot`` of per-key vectors in ``rollout.lookdata``, the covariate's
slope in ``rollout.covariate``). NumPy hands a dot product over a few thousand elements to OpenBLAS,
which splits it over a thread per core and has those threads spin while they wait for the next call. On
an idle machine that is harmless; beside other work that keeps the cores busy it is not. Measured here
(2 cores, 2026-12-07), one look's ``build_look_data`` with OpenBLAS's default two threads against one:
with a fresh clone's ``make test`` running beside, 116 against 19 ms over 20,000 rows (integer units),
and six dots of 18,000 elements 32 against 0.03 ms; with two simulation workers beside, medians of 7,
twice each, 39-72 against 24-25 ms over 20,000 rows and 332-361 against 219-276 ms over 200,000
(string units, as the database returns them). The spinning threads also take CPU from the processes
next to them.

So the look process (``rollout.lookprocess``) and the simulation's runs (``rollout.simulate``) run with
one BLAS thread. threadpoolctl (a scikit-learn dependency, declared here in its own right) sets the
limit in a running process, whatever BLAS NumPy was built with; an environment variable would have to
be set before NumPy is first imported.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> threadpool_limits:
    """Limit BLAS to one thread; a context manager, or in effect from the call on if not used as one."""
    return threadpool_limits(limits=1, user_api="blas")
