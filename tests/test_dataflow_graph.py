"""Every Beam job builds for Dataflow, offline: options validated, graph translated, job request assembled.

The pipelines are built with Dataflow options (``--runner=DataflowRunner --project --region --temp_location``) and
run as DataflowRunner's dry run (``--dry_run=True``): the runner applies its overrides, stages the dependencies
locally (building the ``--setup_file`` sdist), translates the graph to the portable proto, assembles the job
request, and returns before any credential, GCS or Dataflow API call. ``DryRunPipeline.run`` refuses to run
without ``--dry_run``, so nothing here can submit a job. The graphs also round-trip through
``Pipeline.to_runner_api`` / ``Pipeline.from_runner_api``, which re-creates every DoFn from its pickled payload.

Pipelines: the preprocessing job's fit pass (``build_fit_pipeline``) and write pass (through ``preprocess.run``
with ``--whitening``), and the tagging job (through ``tag_segments.run``).
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import DebugOptions, SetupOptions, StandardOptions, WorkerOptions
from apache_beam.options.pipeline_options import TestOptions as BeamTestOptions  # not a pytest class
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

from beam_jobs import options as job_options
from beam_jobs import preprocess, tag_segments
from conftest import REAL_DATA
from pipeline.whitening import MomentAccumulator, fit_whitening_set

REPO = Path(__file__).resolve().parents[1]
# Syntactically valid names (Beam's validator checks them; an invalid bucket would make it try to create one).
DATAFLOW = ["--runner=DataflowRunner", "--project=yt8m-offline-test", "--region=us-central1",
            "--temp_location=gs://yt8m-offline-test/tmp", "--dry_run=True"]
IMAGE = "us-central1-docker.pkg.dev/yt8m-offline-test/beam/yt8m-cma:tagging"


class DryRunPipeline(beam.Pipeline):
    """A pipeline whose ``run`` is DataflowRunner's dry run; keeps the graph it was asked to run and the runner."""

    def run(self, test_runner_api="AUTO"):
        assert isinstance(self.runner, DataflowRunner), self.runner
        assert self._options.view_as(BeamTestOptions).dry_run, "refusing to submit a job from a test"
        self.graph = self.to_runner_api()
        return super().run(test_runner_api)


def names(proto: beam_runner_api_pb2.Pipeline) -> set[str]:
    return {t.unique_name for t in proto.components.transforms.values()}


def round_trip(p: beam.Pipeline) -> beam.Pipeline:
    """``p`` through its runner-API proto and back; the copy's proto names the same transforms."""
    proto = p.to_runner_api()
    copy = beam.Pipeline.from_runner_api(proto, p.runner, p._options)
    again = copy.to_runner_api()
    assert names(again) == names(proto)
    assert len(again.components.pcollections) == len(proto.components.pcollections)
    return copy


def environment(runner: DataflowRunner) -> tuple[str, dict[str, str]]:
    """(container image, {staged name: local file}) of the job's one SDK environment."""
    envs = list(runner.proto_pipeline.components.environments.values())
    assert len(envs) == 1, [e.urn for e in envs]
    env = envs[0]
    assert env.urn == "beam:env:docker:v1"
    image = beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
    staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name:
              beam_runner_api_pb2.ArtifactFilePayload.FromString(d.type_payload).path for d in env.dependencies}
    return image, staged


def dofn(p: beam.Pipeline, label: str):
    """The DoFn of the one ParDo labelled ``label`` in ``p`` (a ParDo with tagged outputs nests its own
    ``ParDo(Fn)`` under the label)."""
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            fn = getattr(node.transform, "fn", None)
            if fn is not None and (node.full_label == label or node.full_label.startswith(label + "/")):
                found.append(fn)

    p.visit(Visitor())
    assert len(found) == 1, (label, found)
    return found[0]


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """setup.py, setup.cfg, README.md and the packages in a temporary folder: ``--setup_file`` there makes Beam
    build the sdist (``setup.py sdist``) outside the working tree."""
    dest = tmp_path_factory.mktemp("project")
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for pkg in ("pipeline", "beam_jobs", "model"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_dataflow_gets_the_project_shipped_unless_told_otherwise():
    opts = job_options.make_pipeline_options(DATAFLOW, save_main_session=False)
    assert opts.view_as(SetupOptions).setup_file == str(REPO / "setup.py")
    for other in (f"--sdk_container_image={IMAGE}", "--setup_file=/elsewhere/setup.py",
                  "--extra_package=dist/yt8m_cma-0.1.0.tar.gz", "--requirements_file=reqs.txt"):
        opts = job_options.make_pipeline_options(DATAFLOW + [other], save_main_session=False)
        assert opts.view_as(SetupOptions).setup_file in (None, "/elsewhere/setup.py"), other
    assert not job_options.is_local(opts) and job_options.make_runner(opts) is None


def test_fit_pass_builds_for_dataflow(tmp_path):
    args = preprocess.get_args_parser().parse_args(
        ["--input", str(REAL_DATA / "*.tfrecord"), "--output", "gs://yt8m-offline-test/data/validate",
         "--level", "video", "--features", "rgb,audio"])
    cfg = preprocess.resolve_config(args)
    opts = job_options.make_pipeline_options(DATAFLOW + [f"--sdk_container_image={IMAGE}",
                                                         "--experiments=use_runner_v2"], save_main_session=False)
    p = DryRunPipeline(options=opts)
    preprocess.build_fit_pipeline(p, cfg, preprocess.match_input(cfg.input), cfg.path("moments.npz"))
    built = names(p.to_runner_api())
    assert {"ReadVideos/ListFiles", "ReadVideos/SpreadFiles", "ReadVideos/OpenFiles", "ReadVideos/ReadFraming",
            "ReadVideos/Decode", "CountUnusable", "FeatureMoments", "SaveMoments"} <= built
    copy = round_trip(p)
    decode = dofn(copy, "ReadVideos/Decode")
    assert isinstance(decode, preprocess.DecodeVideoFn) and decode.features == ("rgb", "audio")

    result = p.run()
    assert result.state == "DONE"
    runner = p.runner
    image, staged = environment(runner)
    assert image == IMAGE and "workflow.tar.gz" not in staged  # the image carries the code
    assert "use_runner_v2" in opts.view_as(DebugOptions).experiments
    assert {"ReadVideos/Decode", "FeatureMoments"} <= names(runner.proto_pipeline)
    assert runner.job.proto.type.name == "JOB_TYPE_BATCH"


def test_write_pass_builds_for_dataflow_with_the_setup_file(tmp_path, project_copy):
    # statistics to reuse (--whitening skips the fit pass): audio only, fitted on random frames
    rng = np.random.default_rng(0)
    whitening = str(tmp_path / "whitening.npz")
    fit_whitening_set({"audio": MomentAccumulator.of(rng.standard_normal((300, 128)))}, dims=16).save(whitening)
    made: list[DryRunPipeline] = []

    def factory(options):
        made.append(DryRunPipeline(options=options))
        return made[-1]

    summary = preprocess.run(
        ["--input", str(REAL_DATA / "*.tfrecord"), "--output", str(tmp_path / "out"), "--level", "video",
         "--features", "audio", "--whitening", whitening, "--num-shards", "4",
         f"--setup_file={project_copy / 'setup.py'}"] + DATAFLOW,
        save_main_session=False, test_pipeline=factory)
    assert len(made) == 1  # the write pass only
    assert summary["read"] == 0 and summary["written"] == 0  # nothing ran
    p = made[0]
    assert {"ReadVideos/ReadFraming", "ReadVideos/Decode", "Whiten", "WriteShards/WriteParquet",
            "AllDeadLetters", "WriteDeadLetters/ToJson", "WriteDeadLetters/WriteJsonl"} <= names(p.graph)
    whiten = dofn(round_trip(p), "Whiten")
    # the run reads the statistics it copied next to its output (OUT/whitening.npz), on every worker
    assert isinstance(whiten, preprocess.WhitenVideoFn)
    assert whiten.whitening_path == str(tmp_path / "out" / "whitening.npz")

    # the job ships the project as Beam's stager built it from --setup_file: the sdist workers pip-install
    image, staged = environment(p.runner)
    assert image.startswith("gcr.io/cloud-dataflow/v1beta3/beam_python3")  # Dataflow's default SDK image
    assert "workflow.tar.gz" in staged, sorted(staged)
    with tarfile.open(staged["workflow.tar.gz"]) as tar:
        members = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read()
    assert {"beam_jobs/preprocess.py", "pipeline/example_proto.py", "setup.cfg"} <= members
    # setup_file installs install_requires only (Beam's boot installs workflow.tar.gz without extras): no torch
    core = [line for line in pkg_info.decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not [line for line in core if "torch" in line or "tensorflow" in line]
    # ... and that is all a preprocessing worker adds to Dataflow's default image (which brings apache-beam[gcp])
    assert {"numpy", "pyarrow", "fsspec", "gcsfs", "protobuf", "google-crc32c", "threadpoolctl"} <= {
        line.split(":", 1)[1].strip().split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
        for line in core}


@pytest.fixture(scope="module")
def tagging_inputs(tmp_path_factory):
    from shard_factory import write_random_shards
    from test_tag_segments_beam import DIM, NUM_CLASSES, write_checkpoint

    root = tmp_path_factory.mktemp("tag_graph")
    data = write_random_shards(root / "data", num_videos=6, num_shards=2, dims={"rgb": DIM}, seed=3,
                               num_classes=NUM_CLASSES, frames=(1, 40))
    return data.root, write_checkpoint(root / "best.pt")


def test_tagging_job_builds_for_dataflow_with_one_model_per_vm(tmp_path, tagging_inputs):
    data, ckpt = tagging_inputs
    made: list[DryRunPipeline] = []

    def factory(options):
        made.append(DryRunPipeline(options=options))
        return made[-1]

    summary = tag_segments.run(
        ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
         "--min-batch-size", "4", "--max-batch-size", "16", "--model-copies", "2",
         f"--sdk_container_image={IMAGE}", "--experiments=use_runner_v2",
         "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"]
        + DATAFLOW, save_main_session=False, test_pipeline=factory)
    assert summary["rows"] == 0 and summary["shards"] == 2  # built and dry-run, nothing tagged
    p = made[0]
    assert {"ShardPaths", "SpreadShards", "ReadVideos", "ScoreSegments", "ScoreSegments/BeamML_RunInference",
            "ToTagRows", "WriteTags", "DeadLetterJson", "WriteDeadLetters"} <= names(p.graph)

    # the RunInference DoFn as a worker unpickles it: one shared model (2 copies) per VM, the batch bounds asked
    inference = dofn(round_trip(p), "ScoreSegments/BeamML_RunInference")
    handler = inference._model_handler
    assert handler.share_model_across_processes() and handler.model_copies() == 2
    assert dict(handler.batch_elements_kwargs()) == {"min_batch_size": 4, "max_batch_size": 16}
    image, staged = environment(p.runner)
    assert image == IMAGE and "workflow.tar.gz" not in staged
    options = p._options
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(WorkerOptions).sdk_container_image == IMAGE

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["share_model"] is True and config["model_copies"] == 2
    assert (config["min_batch_size"], config["max_batch_size"]) == (4, 16)
