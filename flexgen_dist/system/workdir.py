"""Private per-process directories for temporary files (disk-homed KV cache and activations),
and the removal of every temporary file on every exit a process can see.

Each process works in `<offload>/work/<pid>-<random>/`, holding an exclusive lock on the `owner`
file inside for as long as it lives. Every exit a process can see (normal end, exception, SIGINT,
SIGTERM, a lost peer) removes its directory; what a process that could not see its end (SIGKILL,
the OOM killer, power loss) leaves behind is removed by the next process that opens the same work
root: the kernel dropped the dead owner's lock, so taking it succeeds. A live owner's lock cannot
be taken, so its files are never touched, whatever its PID.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
import time

from ..core.errors import FlexGenError, StoreError

OWNER = "owner"
_live: dict[str, int] = {}  # this process's work dirs -> their lock file descriptors
_partial: set[str] = set()  # files being written now (a store tensor, an output), removed if we die
_lock = threading.RLock()  # reentrant: a signal handler may run while the main thread holds it
_exiting = threading.Event()  # the process has begun its final cleanup: nothing new may appear after it
EXIT_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def open_work_dir(root: str) -> str:
    """A new private directory under `root` for this process, after removing dead processes' ones.
    It is made and registered in one step under the registry's lock, so an exit's cleanup running
    on another thread either removes it or runs before it exists and keeps it from being made:
    this thread then waits for the process to end."""
    private_dir(root, "work directory")
    sweep(root)
    with _lock:
        if not _exiting.is_set():
            path = os.path.join(root, f"{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(path, 0o700)
            fd = os.open(os.path.join(path, OWNER), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _live[path] = fd
            return path
    _wait_for_the_end()


def _wait_for_the_end() -> None:
    """Block a thread that would create files once the final cleanup has begun: the thread running
    that cleanup ends the process next (with the lock released, so the cleanup can finish)."""
    threading.Event().wait()


def sweep(root: str) -> list[str]:
    """Remove the work dirs under `root` whose owner process is gone; returns what was removed."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if path in _live or not os.path.isdir(path) or os.path.islink(path):
            continue
        if _owner_is_gone(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owner_is_gone(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, OWNER), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:  # its owner died between mkdir and creating the lock, or it is not ours
        return not any(True for _ in os.scandir(path)) or _looks_dead(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _looks_dead(path: str) -> bool:
    """A lockless work dir: dead if the PID in its name no longer exists."""
    try:
        os.kill(int(os.path.basename(path).split("-")[0]), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return False


def remove_work_dir(path: str) -> None:
    """Remove one of this process's work dirs and release its lock. On a signal another thread
    may still be writing into it: the dir is first renamed away, so no new file can appear under
    its name, then removed, again until nothing is left (a file created mid-way is caught)."""
    with _lock:
        fd = _live.pop(path, None)
    doomed = f"{path}.removing"
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    for _ in range(100):
        shutil.rmtree(doomed, ignore_errors=True)
        if not os.path.lexists(doomed):
            break
        time.sleep(0.01)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def partial_file(path: str):
    """While the block runs, `path` is a file being written: removed if the process ends first
    (and by the block itself if it raises)."""
    with _lock:
        exiting = _exiting.is_set()
        if not exiting:
            _partial.add(path)
    if exiting:
        _wait_for_the_end()
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    finally:
        with _lock:
            _partial.discard(path)


def remove_all() -> None:
    """Remove every work dir and half-written file of this process (at exit, on a signal, and
    before an abrupt `os._exit`)."""
    with _lock:
        work, partial = list(_live), list(_partial)
    for path in work:
        remove_work_dir(path)
    for path in partial:
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_all_before_exit() -> None:
    """`remove_all` for a process that ends next (`os._exit`): from now on no work dir or partial
    file can appear, even from another thread that was about to make one."""
    with _lock:
        _exiting.set()
    remove_all()


def exit_cleanly_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end the process after removing its temporary files, even while
    the main thread is blocked in a long native call (a collective, a disk read), where a Python
    signal handler would not run until the call returns (and a launcher escalates to SIGKILL):
    CPython's C-level handler writes each signal's number to a wakeup pipe, in whatever thread
    the kernel delivered it to, and a thread of our own reading that pipe acts at once. Call it
    from the main thread."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda number, frame: _stop(number))  # also the main thread's own path
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch():
        while True:
            for number in os.read(read_end, 64):
                if number in EXIT_SIGNALS:
                    _stop(number)
    threading.Thread(target=watch, name="flexgen-signals", daemon=True).start()


_stopping = threading.RLock()  # re-entrant: a second signal may run its handler inside the first's cleanup


def _stop(number: int) -> None:
    """Clean up and exit. A signal may reach both the Python handler and the pipe reader: the
    first caller does the work, a second one in another thread waits for the exit (it must not
    exit halfway); one in the same thread (a handler run inside the first's cleanup) exits. The
    exit happens whatever fails on the way: with the launcher gone, writing to its stderr pipe
    raises, and an exception here would leave the lock held and every later signal ignored."""
    _stopping.acquire()
    try:
        remove_all_before_exit()
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr
            print(f"{signal.Signals(number).name}: stopped; temporary files removed", file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_SIGNALS[number])


PRIVATE_DIR_MODE = 0o700  # directories the engine creates: nobody else may list or plant files there


def is_own_dir(path: str) -> bool:
    """Whether `path` is a directory (not a link to one) that this user owns."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _user(uid: int) -> str:
    try:
        import pwd
        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _refuse(path: str, what: str, st: os.stat_result) -> StoreError | None:
    """Why the engine must not use `path` (a symlink it did not make, another user's file), if so."""
    fix = "remove it or choose another --offload-dir"
    if stat.S_ISLNK(st.st_mode):
        return StoreError(f"{what} {path} is a symbolic link, which the engine does not follow; {fix}")
    if st.st_uid != os.geteuid():
        return StoreError(f"{what} {path} belongs to {_user(st.st_uid)}, not to you ({_user(os.geteuid())}); "
                          f"refusing to use it: {fix}")
    return None


def private_dir(path: str, what: str, follow: bool = False) -> str:
    """`path` as a directory of this user: created mode 0700 (with missing parents) if absent,
    else one this user owns. A symlink (unless `follow`: the user's own offload dir may be one),
    a non-directory or another user's directory is refused with a StoreError naming it; failing
    to create it raises the OSError."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent != path and not os.path.isdir(parent):
            private_dir(parent, what, follow=True)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:  # another rank or job made it meanwhile: check it as any other
            pass
        st = os.stat(path) if follow else os.lstat(path)
    error = _refuse(path, what, st)
    if error is None and not stat.S_ISDIR(st.st_mode):
        error = StoreError(f"{what} {path} is not a directory; remove it or choose another --offload-dir")
    if error is not None:
        raise error
    return path


def open_lock(path: str) -> int:
    """A lock file's descriptor: created mode 0600 if absent, never truncated, never through a
    symlink (another local user's link would otherwise point the engine at a file of theirs or
    yours). Another user's file is refused with a StoreError naming it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:  # ELOOP for a symlink; some kernels answer EACCES in a sticky directory
        if e.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM):
            raise
        error = _refuse(path, "lock file", os.lstat(path))
        raise error or StoreError(f"lock file {path} cannot be opened ({e.strerror}); remove it or choose "
                                  "another --offload-dir") from None
    st = os.fstat(fd)
    error = _refuse(path, "lock file", st) or (None if stat.S_ISREG(st.st_mode) else
                                               StoreError(f"lock file {path} is not a regular file; remove it"))
    if error is not None:
        os.close(fd)
        raise error
    return fd


def create_new(path: str) -> int:
    """A new file's descriptor, mode 0600, opened for writing: created here (O_EXCL), so never
    another user's file nor a symlink's target. A leftover of a crashed run is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # the directory is private, so the leftover is our own
        return os.open(path, flags, 0o600)


def prepare_offload_dir(path: str) -> str:
    """The offload dir as an absolute path, ready for use: created mode 0700 if absent (so are its
    `weights` and `work` subdirectories), owned by this user and writable. A directory (or a link
    planted where one belongs) of another user is refused with one line naming it: the engine
    would read weights from, and write caches into, a place that user controls."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        private_dir(path, "offload dir", follow=True)  # the user's own path may be a symlink
        for sub in ("weights", "work"):
            private_dir(os.path.join(path, sub), "offload dir")
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        os.close(create_new(probe))
        os.remove(probe)
    except OSError as e:
        raise FlexGenError(f"offload dir {path} is not writable ({e.strerror})") from None
    return path


atexit.register(remove_all)
