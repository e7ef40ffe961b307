"""The one way every script reports a user error: `error: <message>` on stderr and exit status 1, no traceback (the
library's errors already name the file and the fix). Set LIT_ALIGNER_DEBUG=1 to see the traceback instead."""

import os
import sys
from typing import Any, Callable

import tyro


def run_cli(main: Callable[..., Any], **tyro_kwargs: Any) -> Any:
    """`tyro.cli(main)`, with ValueError/OSError (our CheckpointError, DataError, TrainError, ... are ValueErrors) as
    one `error:` line, exit 1, and Ctrl-C as exit 130 (a training run saves its checkpoint before that)."""
    try:
        return tyro.cli(main, **tyro_kwargs)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("LIT_ALIGNER_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
