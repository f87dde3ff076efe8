"""Entry-point wrapper: user errors end with one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from pipeline.errors import Yt8mError
from pipeline.storage import storage_error_line


def run_cli(main: Callable, parser, argv=None) -> None:
    args = parser.parse_args(argv)
    try:
        main(args)
    except Yt8mError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: no such file: {e.filename or e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # an object store's network or credential failure: one line, not its traceback
        line = storage_error_line(e, sys.argv[1:] if argv is None else argv)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
