"""File writing that never leaves a half-written file: write to a temporary file in
the same folder, then rename it over the target (atomic on POSIX and Windows)."""

import os
import tempfile


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` atomically (creating its folder if needed)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
