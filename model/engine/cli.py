"""Entry-point wrapper: user errors end with one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from pipeline.storage import quiet_object_store_logs, user_error_line


def run_cli(main: Callable, parser, argv=None) -> None:
    args = parser.parse_args(argv)
    quiet_object_store_logs()
    try:
        main(args)
    except Exception as e:  # project errors, missing files, object-store failures: one line, not a traceback
        line = user_error_line(e, sys.argv[1:] if argv is None else argv)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
