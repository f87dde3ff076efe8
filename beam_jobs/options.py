"""Runner defaults shared by the Beam jobs: Beam's Python FnApiRunner locally, every other runner unchanged.

Why not plain ``--runner=DirectRunner``: since Beam 2.6x the DirectRunner first hands a pipeline to the Go
PrismRunner, which downloads its binary from GitHub on first use; offline that costs a failed download before Beam
falls back. When the user names no runner we therefore instantiate ``FnApiRunner`` ourselves (the engine the
DirectRunner falls back to) and run its workers as separate processes (``direct_running_mode=multi_processing``,
one per core unless ``--direct_num_workers`` says otherwise; a single worker stays in process). Nothing here
touches the network. A named runner (``DataflowRunner``, ``DirectRunner``, ``PrismRunner`` ...) gets the options
exactly as given, except that Dataflow is pointed at this repository's ``setup.py`` when no other way of
shipping the code to the workers was chosen.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions, SetupOptions,
                                                  StandardOptions)
from apache_beam.runners.portability.fn_api_runner import FnApiRunner


REPO_ROOT = Path(__file__).resolve().parents[1]
# Each local worker process gets one BLAS thread: N single-threaded workers beat N workers fighting over cores.
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_CODE_SHIPPING_OPTIONS = ("setup_file", "requirements_file", "extra_packages", "sdk_container_image")

_LOGGER = logging.getLogger(__name__)


def _given(beam_args: Sequence[str], flag: str) -> bool:
    """Whether ``--flag`` (as ``--flag=x`` or ``--flag x``) appears in ``beam_args``."""
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in beam_args)


def is_local(options: PipelineOptions) -> bool:
    """True when no runner was named, i.e. the job runs on our local FnApiRunner."""
    return options.view_as(StandardOptions).runner is None


def spare_core_per_worker(options: PipelineOptions) -> bool:
    """Whether every worker of this job has a second core to itself: only a local run with at most half as many
    workers as the machine has cores. Dataflow starts one SDK process per vCPU, so its workers never do."""
    if not is_local(options):
        return False
    workers = options.view_as(DirectOptions).direct_num_workers or 1
    return 2 * workers <= (os.cpu_count() or 1)


def make_pipeline_options(beam_args: Sequence[str], save_main_session: bool = True) -> PipelineOptions:
    """Beam options from the command-line arguments our own parser did not consume, with local defaults.

    Args:
        beam_args: leftover arguments, e.g. ``["--runner=DataflowRunner", "--project=p"]`` or ``[]``.
        save_main_session: pickle the ``__main__`` module's globals for the workers (Beam examples' default).
    """
    beam_args = list(beam_args)
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    if is_local(options):
        direct = options.view_as(DirectOptions)
        if not _given(beam_args, "direct_num_workers"):
            direct.direct_num_workers = os.cpu_count() or 1
        if direct.direct_num_workers == 0:
            direct.direct_num_workers = os.cpu_count() or 1
        if not _given(beam_args, "direct_running_mode"):
            direct.direct_running_mode = "multi_processing" if direct.direct_num_workers > 1 else "in_memory"
    elif options.view_as(StandardOptions).runner in ("DataflowRunner", "dataflow"):
        all_options = options.get_all_options()
        shipped = any(all_options.get(name) for name in _CODE_SHIPPING_OPTIONS)
        if not shipped and (REPO_ROOT / "setup.py").exists():
            setup = options.view_as(SetupOptions)
            setup.setup_file = str(REPO_ROOT / "setup.py")
            _LOGGER.info("Dataflow workers will install this project from %s", setup.setup_file)
    return options


@contextlib.contextmanager
def worker_environment(options: PipelineOptions) -> Iterator[None]:
    """While a local pipeline runs, the environment its worker subprocesses inherit: one BLAS thread each and
    this project importable. Values the user already set are kept; everything is restored afterwards, so the
    calling process (a test session, a notebook) is left as it was. No effect for other runners."""
    if not is_local(options):
        yield
        return
    saved = {var: os.environ.get(var) for var in (*BLAS_THREAD_VARS, "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")
    # The record codec is TensorFlow-free (pipeline.records), so workers do not import TensorFlow; should a user's
    # DoFn or an installed plugin import it after all, it prints no INFO banner per worker.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def make_runner(options: PipelineOptions) -> beam.runners.PipelineRunner | None:
    """The runner to construct a pipeline with: ``LocalRunner`` when none was named, else None (Beam picks it)."""
    if not is_local(options):
        return None
    return LocalRunner()


class LocalRunner(FnApiRunner):
    """``FnApiRunner`` whose worker subprocesses start inside ``worker_environment`` (its run is blocking)."""

    def run_pipeline(self, pipeline, options):
        with worker_environment(options):
            return super().run_pipeline(pipeline, options)


def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline on ``make_runner(options)``; the default factory of every job in ``beam_jobs``."""
    return beam.Pipeline(runner=make_runner(options), options=options)


def runner_name(options: PipelineOptions) -> str:
    """Human-readable runner description for config files and logs."""
    if is_local(options):
        direct = options.view_as(DirectOptions)
        return f"FnApiRunner({direct.direct_running_mode}, workers={direct.direct_num_workers})"
    return str(options.view_as(StandardOptions).runner)


def run_job(run: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """A job's command line: quiet logging, and a project error as one line on stderr with exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Local workers' start-up chatter (e.g. "No semi_persistent_directory found") is relayed at WARNING.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines, if anything imports it
    from pipeline.storage import quiet_object_store_logs

    quiet_object_store_logs()
    try:
        run(argv)
    except Exception as e:  # project errors, missing files, object-store failures: one line, not a traceback
        from pipeline.storage import user_error_line

        line = user_error_line(e, sys.argv[1:] if argv is None else argv)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    return 0
