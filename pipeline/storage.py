"""Object-store failures (no network, DNS, timeouts, refused credentials) told in one line.

gcsfs and its stack (aiohttp, google-auth) raise their own exception types, often wrapped several times; an entry
point that lets them through prints a long traceback, and one that catches them as "unreadable file" calls a good
file corrupt. ``storage_cause`` recognizes them anywhere in an exception's cause chain and says what went wrong;
``remote_paths`` picks the URLs from a command line so the message can name what could not be reached.
"""
from __future__ import annotations

import socket
from typing import Iterable, Sequence

from pipeline.errors import Yt8mError

# exception modules of the object-store stacks fsspec uses (GCS, S3, HTTP)
_STORE_MODULES = ("aiohttp", "google.auth", "google.api_core", "gcsfs", "requests", "urllib3", "botocore", "s3fs")
_CREDENTIAL_WORDS = ("credential", "unauthorized", "forbidden", "permission", "401", "403", "refresh", "token")


class StorageError(Yt8mError):
    """An object store could not be reached or refused the credentials."""


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_cause(exc: BaseException) -> str | None:
    """"credentials refused (...)" / "cannot reach the object store (...)" when ``exc`` or anything in its cause
    chain comes from the network or credentials side of an object-store client; None otherwise."""
    for e in _chain(exc):
        module = type(e).__module__ or ""
        if module.startswith(_STORE_MODULES) or isinstance(e, (socket.gaierror, ConnectionError, TimeoutError)):
            text = (str(e).strip().splitlines() or [""])[0][:200]
            detail = f"{type(e).__name__}: {text}" if text else type(e).__name__
            words = f"{module} {type(e).__name__} {text}".lower()
            if any(w in words for w in _CREDENTIAL_WORDS) or getattr(e, "code", None) in (401, 403):
                return f"credentials refused or missing ({detail}); run `gcloud auth application-default login` " \
                       f"or set GOOGLE_APPLICATION_CREDENTIALS"
            return f"cannot reach the object store ({detail}); check the network"
    return None


def remote_paths(argv: Sequence[str] | None) -> list[str]:
    """The URLs (``scheme://...``, not ``file://``) among command-line arguments, ``--flag=URL`` included."""
    out = []
    for a in argv or ():
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if "://" in value and not value.startswith("file://"):
            out.append(value)
    return out


def storage_error_line(exc: BaseException, argv: Sequence[str] | None) -> str | None:
    """The one line an entry point prints for an object-store failure, naming the remote paths it was given."""
    cause = storage_cause(exc)
    if cause is None:
        return None
    paths = remote_paths(argv)
    where = ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "") if paths else "a remote path"
    return f"error: {where}: {cause}"


def user_error_line(exc: BaseException, argv: Sequence[str] | None) -> str | None:
    """The one line every entry point prints instead of a traceback: a project error, a missing local file, or an
    object-store failure (naming the remote paths of ``argv``); None for anything else (a bug: let it raise)."""
    if isinstance(exc, Yt8mError):
        return f"error: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"error: no such file: {exc.filename or exc}"
    return storage_error_line(exc, argv)


def quiet_object_store_logs() -> None:
    """Silence gcsfs's own log lines for a command-line run: it logs a warning per bucket probe and the full
    traceback of a request that ran out of retries, which the entry points already turn into one line naming the
    path and the cause. ``GCSFS_DEBUG`` (gcsfs's own switch) keeps them."""
    import logging
    import os

    if not os.environ.get("GCSFS_DEBUG"):
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
