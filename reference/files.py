"""Writing output files: reports, run files and benchmark results.

A path given for output is one of:

- a regular file, or a name that does not exist yet: written atomically (a temporary
  ``.tmp-*`` file in the same folder, fsynced, then renamed over the target), so a reader
  sees the old contents or the new, never half a file; an existing file keeps its mode,
  a new one gets the umask's; missing folders are created;
- a symlink: followed to its target (the link stays a link; a link to a missing file
  creates that file);
- a special file (a FIFO, a device such as /dev/null) or a descriptor of this process
  (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N): written directly, never
  replaced; a descriptor is appended to, so what was printed before stays;
- a directory, or a path nobody can write: refused.

:func:`check_writable` and :func:`check_output_dir` say before any work whether a file
or a run directory can be written, raising :class:`OutputPathError` with a message that
names the option. This module imports nothing else of the repository.
"""

import errno
import os
import re
import secrets
import stat
import sys

_FD_DIR = re.compile(r"^/proc/(self|thread-self|\d+)(/task/\d+)?/fd$")
_MAX_LINKS = 40


class OutputPathError(ValueError):
    """An output path cannot be written (raised before any work where it can be seen);
    the message starts with the option and the path."""


def _resolve(path):
    """(kind, path): follow symlinks by hand to the file that would be written.

    kind: 'descriptor' (a /proc/PID/fd entry: /dev/stdout and friends), 'missing' (no such
    file yet), 'regular', 'directory' or 'special' (FIFO, device, socket)."""
    p = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        parent = os.path.realpath(os.path.dirname(p))
        p = os.path.join(parent, os.path.basename(p))
        if _FD_DIR.match(parent):
            return "descriptor", p
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return "missing", p
        except NotADirectoryError:
            return "missing", p          # a parent is a file: check_writable says so
        if stat.S_ISLNK(st.st_mode):
            p = os.path.normpath(os.path.join(parent, os.readlink(p)))
            continue
        if stat.S_ISREG(st.st_mode):
            return "regular", p
        if stat.S_ISDIR(st.st_mode):
            return "directory", p
        return "special", p
    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)


def is_special(path):
    """True when ``path`` is written directly (a FIFO, a device or a descriptor such as
    /dev/stdout) rather than as a regular file."""
    try:
        return _resolve(path)[0] in ("descriptor", "special")
    except OSError:
        return False


def _nearest_folder(p):
    """The nearest existing ancestor of ``p`` (p itself excluded)."""
    d = os.path.dirname(p)
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    return d


def _probe_folder(folder, what, path):
    """OutputPathError unless a file can be created in ``folder`` (an existing directory),
    shown by creating and removing one: permission bits do not stop root, a read-only
    mount or /proc does."""
    if not os.path.isdir(folder):
        raise OutputPathError(f"{what} {path}: {folder} is not a directory")
    probe = os.path.join(folder, f".tmp-probe-{secrets.token_hex(6)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputPathError(f"{what} {path}: cannot create files in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable(path, what):
    """Raise :class:`OutputPathError` (its message starts with ``what``, the option, and
    ``path``) unless :func:`write_text_atomic` can write ``path``. Nothing is created or
    changed except a probe file, created and removed again; a FIFO is not opened."""
    if not isinstance(path, str) or not path:
        raise OutputPathError(f"{what}: an empty path; give a file name")
    try:
        kind, p = _resolve(path)
    except OSError as exc:
        raise OutputPathError(f"{what} {path}: {exc.strerror or exc}") from None
    if kind == "directory":
        raise OutputPathError(f"{what} {path}: is a directory; give a file name")
    if kind in ("descriptor", "special"):
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{what} {path}: not writable")
        return
    if kind == "regular":
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{what} {path}: the file is not writable")
        _probe_folder(os.path.dirname(p), what, path)
        return
    _probe_folder(_nearest_folder(p), what, path)


def check_output_dir(path, what="--out"):
    """Raise :class:`OutputPathError` unless ``path`` is a directory files can be created
    in, or can be made one (its nearest existing ancestor is a directory that is
    writable). Symlinks are followed. Nothing is created (but a probe file)."""
    if not isinstance(path, str) or not path:
        raise OutputPathError(f"{what}: an empty path; give a directory")
    p = os.path.realpath(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        kind = "a file" if os.path.isfile(p) else "a special file"
        raise OutputPathError(f"{what} {path}: not a directory (it is {kind})")
    _probe_folder(p if os.path.isdir(p) else _nearest_folder(p), what, path)


def umask():
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path``: atomically for a regular file, directly for a
    special file or a descriptor, following symlinks (see the module docstring). Folders
    that do not exist are created. OSError (e.g. IsADirectoryError) when it cannot."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data):
    """:func:`write_text_atomic` for bytes (checkpoints use it)."""
    kind, p = _resolve(path)
    if kind == "directory":
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if kind == "descriptor":
        _write_descriptor(p, data)
        return
    if kind == "special":
        with open(p, "wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(p)
    os.makedirs(folder, exist_ok=True)
    old = os.stat(p) if kind == "regular" else None
    tmp = os.path.join(folder, f".tmp-{os.path.basename(p)}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if old is not None:
                _keep_owner(f.fileno(), old)
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _write_descriptor(p, data):
    """Write to /proc/PID/fd/N: through descriptor N itself when it is this process's
    (after flushing sys.stdout and sys.stderr), so the text lands where the process's
    own output stands: a shell's ``>`` file is neither truncated nor overwritten later.
    Another process's descriptor is opened for appending."""
    pid, fd = _FD_DIR.match(os.path.dirname(p)).group(1), int(os.path.basename(p))
    if pid not in ("self", "thread-self", str(os.getpid())):
        with open(p, "ab") as f:
            f.write(data)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _keep_owner(fd, old):
    """Give the replacement the replaced file's owner and group where allowed (root)."""
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:
            pass


def write_output(path, text, what):
    """:func:`write_text_atomic`, with a failure (a full disk, a device that refuses the
    write) raised as :class:`OutputPathError` naming the option ``what`` and the path."""
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise OutputPathError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None
