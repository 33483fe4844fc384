"""Where an encryption job's shard tasks run: forked local processes, or any joblib backend.

``processes`` (the default) is a ``concurrent.futures.ProcessPoolExecutor`` whose
workers are forked from the ``encrypt`` process.  A forked worker starts in milliseconds with
numpy, joblib and the job's modules already loaded; a loky worker starts a new interpreter and
imports them again, ~0.25 s before it can even begin loading torch — about 9 % of a
1,500-image run on two cores (``benchmarks/bench_encrypt.py``, part d).  The fork is the first
thing the job does: this process has started no thread yet and never imports torch, so the
workers inherit no held lock and no thread pool.  A worker that dies breaks the pool, and the
run stops with one line; the workers never see Ctrl-C, which this process handles.  Where forking
is not safe (``fork_is_safe``: not Linux, torch loaded, threads running) ``processes`` means loky.

The joblib backends (``loky``, ``multiprocessing``, ``threading``, ``sequential``, ``dask``)
run the same tasks through ``joblib.Parallel``; dask is how a job leaves this machine.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from keyshard.errors import KeyshardError

DEFAULT_BACKEND = "processes"
WORKER_DIED = "a worker process ended abruptly (killed, or out of memory?); continue with `resume=True`"
BACKENDS = ("processes", "loky", "multiprocessing", "threading", "sequential", "dask")


def resolve_backend(backend: str) -> str:
    """``processes`` where forking this process is safe, else loky; any other name is a joblib backend."""
    return "loky" if backend == "processes" and not fork_is_safe() else backend


def fork_is_safe() -> bool:
    """Linux, and this process has neither loaded torch (its thread pools and CUDA state do not
    survive a fork) nor started a thread (one could hold a lock the child would inherit): true of
    ``keyshard encrypt``; not of ``sweep`` or ``demo``, which train in the same process."""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and "torch" not in sys.modules and threading.active_count() == 1)


def worker_count(jobs: int) -> int:
    """``--jobs``: -1 = every core this process may use (cgroup- and affinity-aware, as joblib)."""
    from joblib import cpu_count

    return cpu_count() if jobs < 1 else jobs


@contextmanager
def open_workers(backend: str, jobs: int, initializer, initargs: tuple):
    """Start the workers; each runs ``initializer(*initargs)`` (load torch, compile the key)
    while the caller plans the job.  Yields an object with ``ready()`` (wait for that warm-up)
    and ``run_unordered(fn, arg_tuples)`` (results as they finish)."""
    backend = resolve_backend(backend)
    if backend == "processes" and (n := worker_count(jobs)) > 1:
        workers = ForkedWorkers(n, initializer, initargs)
        try:
            yield workers
        except BaseException:
            workers.abort()
            raise
        workers.close()
        return
    with _joblib_workers("sequential" if backend == "processes" else backend, jobs, initializer,
                         initargs) as workers:
        yield workers


@contextmanager
def _children_ignore_ctrl_c():
    """Worker processes forked inside never see SIGINT: it is blocked here, and the child keeps
    the signal mask.  Ctrl-C reaches the whole process group; this process still gets one that
    arrives meanwhile, as soon as the block ends, and stops its workers.  (The same block around
    loky's start did not keep its workers from seeing it: a Ctrl-C while they import prints
    their tracebacks.  loky is not the default.)"""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to worry about
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ForkedWorkers:
    """A process pool forked from this process (see the module docstring for why)."""

    def __init__(self, n: int, initializer, initargs: tuple):
        self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                                         initializer=initializer, initargs=initargs)
        with _children_ignore_ctrl_c():
            self._pool.submit(int)  # forks all n workers now, before this process starts any thread

    def ready(self) -> None:
        """Nothing to wait for: a worker runs its initializer before its first task."""

    def run_unordered(self, fn, arg_tuples):
        futures = [self._pool.submit(fn, *args) for args in arg_tuples]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise KeyshardError(WORKER_DIED) from None
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop now: queued tasks are cancelled and running ones killed (their temporary files
        stay in .keyshard-partial/tmp, which --resume clears)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        kill = getattr(self._pool, "terminate_workers", None)  # Python >= 3.14
        if kill is not None:
            kill()
            return
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            process.terminate()


class _JoblibWorkers:
    def __init__(self, parallel, delayed, warming):
        self._parallel, self._delayed, self._warming = parallel, delayed, warming

    def ready(self) -> None:
        for _ in self._warming or ():
            pass
        self._warming = None

    def cancel_warm_up(self) -> None:
        if self._warming is not None:
            with warnings.catch_warnings():  # joblib warns that the warm-up was cancelled
                warnings.simplefilter("ignore")
                self._warming.close()

    def run_unordered(self, fn, arg_tuples):
        try:
            yield from self._parallel(self._delayed(fn)(*args) for args in arg_tuples)
        except BrokenProcessPool:  # loky's TerminatedWorkerError is one
            raise KeyshardError(WORKER_DIED) from None


@contextmanager
def _joblib_workers(backend: str, jobs: int, initializer, initargs: tuple):
    from joblib import Parallel, delayed, effective_n_jobs, parallel_config

    with parallel_config(backend=backend, n_jobs=jobs), \
            Parallel(return_as=_result_mode(), batch_size=1) as parallel:
        n_workers = effective_n_jobs(jobs)
        warming = (parallel(delayed(initializer)(*initargs) for _ in range(n_workers))
                   if n_workers > 1 and parallel.return_generator else None)
        workers = _JoblibWorkers(parallel, delayed, warming)
        try:
            yield workers
        except Exception:
            # Let a warm-up still running finish (about a second) rather than abort it: aborting
            # while loky is still handing out the tasks races in its manager thread (KeyError).
            try:
                workers.ready()
            except Exception:
                pass
            raise
        except BaseException:  # Ctrl-C: stop the workers now
            workers.cancel_warm_up()
            raise


def _result_mode() -> str:
    """Results as they finish where the active joblib backend can stream them (loky, threading,
    dask, sequential); all at the end for ``multiprocessing``, which cannot (joblib refuses
    ``generator_unordered`` there)."""
    from joblib.parallel import get_active_backend

    active, _ = get_active_backend()
    return "generator_unordered" if getattr(active, "supports_return_generator", False) else "list"
