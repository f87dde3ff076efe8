"""An object store that cannot be reached or refuses the credentials: one line naming the path and the cause.

A fake fsspec filesystem raises what gcsfs raises (google-auth's DefaultCredentialsError, gcsfs's HttpError 403,
a DNS failure as aiohttp sees it), from every call."""
from __future__ import annotations

import socket

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from model.engine.checkpoint import CheckpointError, load_checkpoint
from model.engine.cli import run_cli
from pipeline.storage import remote_paths, storage_cause


def _no_credentials():
    from google.auth.exceptions import DefaultCredentialsError

    return DefaultCredentialsError("Your default credentials were not found.")


def _forbidden():
    from gcsfs.retry import HttpError

    return HttpError({"code": 403, "message": "caller does not have storage.objects.get access"})


def _no_network():
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("storage.googleapis.com", 443, True, None, None, None, None)
    return aiohttp.ClientConnectorError(key, socket.gaierror(-3, "Temporary failure in name resolution"))


ERRORS = {"credentials": _no_credentials, "forbidden": _forbidden, "network": _no_network}


class FailingFileSystem(AbstractFileSystem):
    protocol = "unreachable"
    error = staticmethod(_no_network)

    def _fail(self, *args, **kwargs):
        raise OSError("request failed") from self.error()

    _open = info = ls = glob = exists = _fail


@pytest.fixture
def failing(request):
    fsspec.register_implementation("unreachable", FailingFileSystem, clobber=True)
    FailingFileSystem.error = staticmethod(ERRORS[request.param])
    FailingFileSystem.clear_instance_cache()
    return request.param


def _expected(kind: str) -> str:
    return "cannot reach the object store" if kind == "network" else "credentials refused or missing"


@pytest.mark.parametrize("failing", list(ERRORS), indirect=True)
def test_cause_is_named_through_the_wrapping(failing):
    try:
        FailingFileSystem()._fail()
    except OSError as e:
        assert _expected(failing) in storage_cause(e)
    assert storage_cause(ValueError("not a storage problem")) is None


@pytest.mark.parametrize("failing", list(ERRORS), indirect=True)
def test_a_remote_checkpoint_that_cannot_be_read_is_not_called_corrupt(failing):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("unreachable://bucket/run/best.pt")
    assert "unreachable://bucket/run/best.pt" in str(e.value) and _expected(failing) in str(e.value)
    assert "corrupt" not in str(e.value)


@pytest.mark.parametrize("failing", ["network", "credentials"], indirect=True)
def test_model_entry_points_print_one_line(failing, capsys):
    from model import evaluate

    argv = ["--checkpoint", "unreachable://bucket/run/best.pt", "--data", "unreachable://bucket/data/validate"]
    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, evaluate.get_args_parser(), argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unreachable://bucket/run/best.pt" in err[0]
    assert _expected(failing) in err[0]


@pytest.mark.parametrize("failing", ["network", "forbidden"], indirect=True)
def test_preprocess_prints_one_line_naming_the_output(failing, capsys):
    from beam_jobs import preprocess
    from conftest import REAL_DATA

    code = preprocess.main(["--input", str(REAL_DATA / "validate0067.tfrecord"), "--level", "video",
                            "--output", "unreachable://bucket/yt8m-cma/train", "--direct_num_workers", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable://bucket/yt8m-cma/train" in err[0] and _expected(failing) in err[0]


def test_remote_paths_from_a_command_line():
    assert remote_paths(["--input", "gs://b/x", "--output=gs://b/y", "local/path", "file:///tmp/z"]) == \
        ["gs://b/x", "gs://b/y"]


def test_gcsfs_log_lines_do_not_precede_the_one_line(monkeypatch, capsys, caplog):
    """gcsfs logs a warning per bucket probe and the traceback of a request out of retries (about 55 lines with
    no network); an entry point shows only its own line unless GCSFS_DEBUG asks for gcsfs's."""
    import argparse
    import logging

    def main(args):
        log = logging.getLogger("gcsfs")
        log.warning("Could not determine bucket type for bucket name b: ..., falling back to GCSFileSystem")
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as e:
            log.exception(f"_request out of retries on exception: {e}")
            raise

    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    logging.getLogger("gcsfs").setLevel(logging.NOTSET)
    monkeypatch.delenv("GCSFS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, parser, ["--data", "gs://b/validate"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "gs://b/validate" in err, err
    assert not [r for r in caplog.records if r.name == "gcsfs"]  # nothing reached any log handler either
    monkeypatch.setenv("GCSFS_DEBUG", "WARNING")
    logging.getLogger("gcsfs").setLevel(logging.NOTSET)
    with pytest.raises(SystemExit):
        run_cli(main, parser, ["--data", "gs://b/validate"])
    assert [r.levelname for r in caplog.records if r.name == "gcsfs"] == ["WARNING", "ERROR"]
