"""The look process computes its sums with one BLAS thread (rollout.blas says why: OpenBLAS's threads
made a look 6x slower beside a busy gateway and took CPU from it)."""

from __future__ import annotations

import logging
import multiprocessing

from threadpoolctl import threadpool_info


def _blas_threads_after_setup(queue) -> None:
    """In a fresh interpreter, as the look process starts: its set-up, then what BLAS reports."""
    from rollout.lookprocess import prepare_child

    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    prepare_child(logging.WARNING)
    after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    queue.put((before, after))


def test_the_look_process_runs_its_blas_on_one_thread():
    ctx = multiprocessing.get_context("spawn")  # as LookProcess starts its child
    queue = ctx.Queue()
    proc = ctx.Process(target=_blas_threads_after_setup, args=(queue,))
    proc.start()
    before, after = queue.get(timeout=60)
    proc.join(timeout=10)
    assert before, "NumPy reports no BLAS library: nothing to limit"
    assert after == [1] * len(before), (before, after)


def test_the_simulation_runs_its_blas_on_one_thread(monkeypatch):
    import rollout.simulate as simulate

    seen: list[list[int]] = []
    real = simulate.run_once

    def spy(*args, **kw):
        seen.append([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"])
        return real(*args, **kw)

    monkeypatch.setattr(simulate, "run_once", spy)
    simulate.simulate("fail", 2, seed=1)
    assert seen and all(threads and set(threads) == {1} for threads in seen), seen
