"""SQLite file-level settings and health, run on the host as the database owner.

Plain Python (standard library only) so pytest imports it directly and the module stays thin.

What it does, in order, and why:
1. Checks the path is a regular file that starts with the 16-byte SQLite magic and has a sane 100-byte header
   *before* SQLite opens it: SQLite would happily turn a stray text file into an empty database.
2. Refuses to run unless the effective uid owns the file: a root-owned ``-wal``/``-shm`` next to an app-owned
   database locks the app out (the app cannot write them).
3. Reads the file-level settings from the header (journal mode is bytes 18/19: 2 = WAL, 1 = rollback journal).
4. Switches the journal mode with a busy timeout (the switch needs an exclusive lock), then verifies the header.
5. Returns health facts: journal mode from the header, WAL size, ``wal_checkpoint(PASSIVE)`` frames, freelist
   ratio, and an opt-in ``quick_check`` bounded by a time limit.

Check mode never opens the file for writing, and opens it through SQLite only when that creates no file.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import sqlite3
import stat
import time
from dataclasses import dataclass

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
JOURNAL_MODES = ("wal", "delete")
# Settings stored in the file; per-connection pragmas (busy_timeout, synchronous, ...) live in the app's config.
FILE_SETTINGS = ("journal_mode", "page_size", "auto_vacuum", "encoding", "user_version", "application_id")
_ENCODINGS = {0: "unset", 1: "UTF-8", 2: "UTF-16le", 3: "UTF-16be"}
_AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}


class SqliteError(Exception):
    """A failure with a one-sentence message: what failed, for which input, why, what to do."""


@dataclass(frozen=True)
class SqliteHeader:
    """The fields of the 100-byte database header that matter here (https://sqlite.org/fileformat.html)."""

    page_size: int
    write_version: int
    read_version: int
    reserved_bytes: int
    change_counter: int
    page_count: int
    freelist_trunk: int
    freelist_count: int
    schema_format: int
    largest_root_page: int
    text_encoding: int
    user_version: int
    incremental_vacuum: int
    application_id: int
    version_valid_for: int
    sqlite_version_number: int

    @property
    def journal_mode(self) -> str:
        """``wal`` when both version bytes are 2, else ``delete`` (any rollback-journal mode: the file
        cannot tell delete/truncate/persist apart, only SQLite's connection state can)."""
        return "wal" if self.write_version == 2 and self.read_version == 2 else "delete"

    @property
    def auto_vacuum(self) -> str:
        if self.largest_root_page == 0:
            return "none"
        return "incremental" if self.incremental_vacuum else "full"

    @property
    def encoding(self) -> str:
        return _ENCODINGS.get(self.text_encoding, str(self.text_encoding))

    @property
    def sqlite_version(self) -> str:
        n = self.sqlite_version_number
        return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}" if n else ""

    def settings(self) -> dict:
        """The file-level settings, as the diff shows them."""
        return {
            "journal_mode": self.journal_mode,
            "page_size": self.page_size,
            "auto_vacuum": self.auto_vacuum,
            "encoding": self.encoding,
            "user_version": self.user_version,
            "application_id": self.application_id,
        }


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def parse_header(data: bytes, path: str = "<bytes>", file_size: int | None = None) -> SqliteHeader:
    """Parse and sanity-check a database header; raise SqliteError naming the first problem found."""
    if len(data) == 0:
        raise SqliteError(
            f"Cannot manage SQLite database {path}: the file is empty (0 bytes), so it has no SQLite header yet. "
            "Let the application create the database first, or fix the path."
        )
    if data[:16] != SQLITE_MAGIC:
        raise SqliteError(
            f"Cannot manage SQLite database {path}: the file does not start with the SQLite header "
            "'SQLite format 3\\0', so it is not a SQLite 3 database. Fix the path."
        )
    if len(data) < HEADER_SIZE:
        raise SqliteError(
            f"Cannot manage SQLite database {path}: the file is {len(data)} bytes, shorter than the 100-byte "
            "header, so it is truncated or corrupt. Restore it from a backup."
        )
    raw_page = _u16(data, 16)
    page_size = 65536 if raw_page == 1 else raw_page
    problems = []
    if page_size < 512 or page_size & (page_size - 1):
        problems.append(f"page size {raw_page} is not a power of two between 512 and 65536")
    if data[18] not in (1, 2) or data[19] not in (1, 2):
        problems.append(f"file format versions {data[18]}/{data[19]} are not 1 (rollback) or 2 (WAL)")
    if data[21:24] != b"\x40\x20\x20":
        problems.append(f"payload fractions {tuple(data[21:24])} are not (64, 32, 32)")
    if _u32(data, 56) not in _ENCODINGS:
        problems.append(f"text encoding {_u32(data, 56)} is not 1, 2 or 3")
    if file_size is not None and not problems and file_size % page_size:
        problems.append(f"file size {file_size} is not a multiple of the page size {page_size}")
    if problems:
        raise SqliteError(
            f"Cannot manage SQLite database {path}: the header is corrupt ({'; '.join(problems)}). "
            "Restore the file from a backup; nothing was changed."
        )
    return SqliteHeader(
        page_size=page_size,
        write_version=data[18],
        read_version=data[19],
        reserved_bytes=data[20],
        change_counter=_u32(data, 24),
        page_count=_u32(data, 28),
        freelist_trunk=_u32(data, 32),
        freelist_count=_u32(data, 36),
        schema_format=_u32(data, 44),
        largest_root_page=_u32(data, 52),
        text_encoding=_u32(data, 56),
        user_version=_u32(data, 60),
        incremental_vacuum=_u32(data, 64),
        application_id=_u32(data, 68),
        version_valid_for=_u32(data, 92),
        sqlite_version_number=_u32(data, 96),
    )


def read_header(path: str) -> SqliteHeader:
    """Read the header of ``path`` without SQLite (no lock, no side file)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = fh.read(HEADER_SIZE)
    except OSError as exc:
        raise SqliteError(
            f"Cannot read SQLite database {path}: {exc.strerror}. Check the path and that the task runs as its owner."
        ) from exc
    return parse_header(data, path, size)


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class SqlitePragmas:
    """Inspect and set the file-level settings of one SQLite database; report its health."""

    def __init__(
        self,
        path: str,
        busy_timeout_ms: int = 5000,
        quick_check: bool = False,
        quick_check_timeout_s: float = 30.0,
    ):
        self.given_path = path
        self.path = os.path.realpath(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.quick_check = bool(quick_check)
        self.quick_check_timeout_s = float(quick_check_timeout_s)
        self.warnings: list[str] = []
        if self.busy_timeout_ms < 0:
            raise SqliteError(
                f"Invalid busy_timeout_ms {busy_timeout_ms} for {path}: it must be 0 or more milliseconds."
            )
        if self.quick_check_timeout_s <= 0:
            raise SqliteError(
                f"Invalid quick_check_timeout_s {quick_check_timeout_s} for {path}: it must be more than 0 seconds."
            )

    # ---- pre-flight: nothing is opened through SQLite before these pass -------------------------------------
    def _stat(self) -> os.stat_result:
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            raise SqliteError(
                f"Cannot manage SQLite database {self.given_path}: the file does not exist. "
                "Fix the path or let the application create the database first."
            ) from exc
        except OSError as exc:
            raise SqliteError(
                f"Cannot stat SQLite database {self.given_path}: {exc.strerror}. "
                "Check the path and the permissions of its directories."
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise SqliteError(
                f"Cannot manage SQLite database {self.given_path}: it is not a regular file. Fix the path."
            )
        return st

    def _check_owner(self, st: os.stat_result) -> None:
        euid = os.geteuid()
        if euid != st.st_uid:
            raise SqliteError(
                f"Refusing to open SQLite database {self.given_path} as {_owner_name(euid)} (uid {euid}): it is "
                f"owned by {_owner_name(st.st_uid)} (uid {st.st_uid}), and -wal/-shm files created by another user "
                f"lock the application out. Run the task with become: true and "
                f"become_user: {_owner_name(st.st_uid)}."
            )

    def side_files(self) -> dict:
        """Existing -wal/-shm/-journal files: size and owner uid."""
        found = {}
        for suffix in ("-wal", "-shm", "-journal"):
            try:
                st = os.stat(self.path + suffix)
            except FileNotFoundError:
                continue
            found[suffix] = {"path": self.path + suffix, "size": st.st_size, "uid": st.st_uid}
        return found

    def _check_side_files(self, st: os.stat_result) -> None:
        for info in self.side_files().values():
            if info["uid"] != st.st_uid:
                raise SqliteError(
                    f"Cannot manage SQLite database {self.given_path}: {info['path']} is owned by "
                    f"{_owner_name(info['uid'])}, not by the database owner {_owner_name(st.st_uid)}, so the "
                    f"application cannot write it. Stop the application and chown that file to "
                    f"{_owner_name(st.st_uid)}."
                )

    def _check_writable(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SqliteError(
                f"Cannot change the journal mode of SQLite database {self.given_path}: its directory {directory} is "
                "not writable by the owner, and SQLite must create -wal/-shm files there. Make the directory "
                "writable by the database owner (or mount it read-write); nothing was changed."
            )
        if not os.access(self.path, os.W_OK):
            raise SqliteError(
                f"Cannot change the journal mode of SQLite database {self.given_path}: the file is not writable by "
                "its owner. Give the owner write permission; nothing was changed."
            )

    # ---- SQLite access -------------------------------------------------------------------------------------
    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
            uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000.0, isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        return conn

    def _sqlite_error(self, action: str, exc: sqlite3.Error) -> SqliteError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            why = (
                f"another connection held a lock for longer than the busy timeout of {self.busy_timeout_ms} ms ({text})"
            )
            todo = "Retry when the application is idle, stop it briefly, or raise busy_timeout_ms"
        elif "readonly" in text or "read-only" in text or "unable to open" in text:
            why = f"SQLite could not write the file or its directory ({text})"
            todo = "Make the file and its directory writable by the database owner"
        elif "not a database" in text or "malformed" in text or "corrupt" in text:
            why = f"the file is corrupt ({text})"
            todo = "Restore it from a backup"
        else:
            why = text
            todo = "Check the file with `sqlite3 <path> 'PRAGMA integrity_check'`"
        return SqliteError(f"Cannot {action} SQLite database {self.given_path}: {why}. {todo}.")

    def _run_quick_check(self, conn: sqlite3.Connection) -> dict:
        deadline = time.monotonic() + self.quick_check_timeout_s
        state = {"timed_out": False}

        def _progress() -> int:
            if time.monotonic() > deadline:
                state["timed_out"] = True
                return 1
            return 0

        started = time.monotonic()
        conn.set_progress_handler(_progress, 1000)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check(10)").fetchall()]
        except sqlite3.OperationalError:
            if not state["timed_out"]:
                raise
            rows = []
        finally:
            conn.set_progress_handler(None, 0)
        seconds = round(time.monotonic() - started, 3)
        if state["timed_out"]:
            return {"ran": True, "ok": None, "timed_out": True, "seconds": seconds, "result": []}
        return {"ran": True, "ok": rows == ["ok"], "timed_out": False, "seconds": seconds, "result": rows}

    def _health(self, header: SqliteHeader, conn: sqlite3.Connection | None) -> dict:
        side = self.side_files()
        wal_size = side.get("-wal", {}).get("size", 0)
        health = {
            "journal_mode_header": header.journal_mode,
            "wal_size_bytes": wal_size,
            # Frame = 24-byte header + page, after a 32-byte file header: an estimate when no checkpoint ran.
            "wal_frames_estimate": max(0, (wal_size - 32) // (header.page_size + 24)) if wal_size else 0,
            "checkpoint": None,
            "page_size": header.page_size,
            "page_count": header.page_count,
            "freelist_count": header.freelist_count,
            "freelist_ratio": round(header.freelist_count / header.page_count, 4) if header.page_count else 0.0,
            "file_size_bytes": os.stat(self.path).st_size,
            "sqlite_version_last_written": header.sqlite_version,
            "quick_check": {"ran": False, "ok": None, "timed_out": False, "seconds": 0.0, "result": []},
        }
        if conn is not None:
            # page_count/freelist from SQLite see WAL content the header may not show yet.
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
            health.update(
                page_count=page_count,
                freelist_count=freelist,
                freelist_ratio=round(freelist / page_count, 4) if page_count else 0.0,
            )
            if self.quick_check:
                health["quick_check"] = self._run_quick_check(conn)
        return health

    def _checkpoint(self, conn: sqlite3.Connection) -> dict:
        busy, log_frames, checkpointed = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return {
            "mode": "PASSIVE",
            "busy": bool(busy),
            "wal_frames": log_frames,
            "checkpointed_frames": checkpointed,
            # Frames a passive checkpoint could not copy back: readers pin them (checkpoint starvation).
            "frames_behind": max(0, log_frames - checkpointed) if log_frames >= 0 else 0,
        }

    def _read_only_is_silent(self, header: SqliteHeader) -> bool:
        """A read-only SQLite open of a WAL database creates -wal/-shm when they are missing."""
        if header.journal_mode != "wal":
            return True
        side = self.side_files()
        return "-wal" in side and "-shm" in side

    # ---- the public entry point --------------------------------------------------------------------------
    def run(self, journal_mode: str = "wal", check_mode: bool = False) -> dict:
        """Bring the file to ``journal_mode``; return changed, before/after settings and health facts."""
        if journal_mode not in JOURNAL_MODES:
            raise SqliteError(
                f"Invalid journal_mode {journal_mode!r} for {self.given_path}: use one of {', '.join(JOURNAL_MODES)} "
                "(the only modes stored in the file)."
            )
        st = self._stat()
        self._check_owner(st)
        header = read_header(self.path)
        self._check_side_files(st)
        before = header.settings()
        needs_change = header.journal_mode != journal_mode
        result = {
            "path": self.path,
            "changed": needs_change,
            "before": before,
            "after": dict(before, journal_mode=journal_mode),
            "owner": _owner_name(st.st_uid),
            "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        }

        if check_mode:
            conn = None
            if self.quick_check and self._read_only_is_silent(header):
                try:
                    conn = self._connect(read_only=True)
                    result["health"] = self._health(header, conn)
                except sqlite3.Error as exc:
                    raise self._sqlite_error("check", exc) from exc
                finally:
                    if conn is not None:
                        conn.close()
            else:
                if self.quick_check:
                    self.warnings.append(
                        "quick_check skipped in check mode: a read-only open of this WAL database would create "
                        "its -wal/-shm files."
                    )
                result["health"] = self._health(header, None)
            result["warnings"] = self.warnings
            return result

        if needs_change:
            self._check_writable()
        conn = None
        try:
            conn = self._connect(read_only=False)
            # Read the schema first: a corrupt body fails here, before anything is written.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if needs_change:
                got = conn.execute(f"PRAGMA journal_mode = {journal_mode.upper()}").fetchone()[0]
                if str(got).lower() != journal_mode:
                    raise SqliteError(
                        f"Cannot switch SQLite database {self.given_path} to journal_mode={journal_mode}: SQLite "
                        f"kept {got!r}, which happens while another connection has the file open in exclusive "
                        "locking mode. Stop the application and run again."
                    )
            after_header = read_header(self.path)
            if after_header.journal_mode != journal_mode:
                raise SqliteError(
                    f"Cannot verify SQLite database {self.given_path}: after the switch its header still says "
                    f"journal_mode={after_header.journal_mode}. Check for a second process rewriting the file."
                )
            health = self._health(after_header, conn)
            if after_header.journal_mode == "wal":
                health["checkpoint"] = self._checkpoint(conn)
        except sqlite3.Error as exc:
            raise self._sqlite_error("switch the journal mode of" if needs_change else "inspect", exc) from exc
        finally:
            if conn is not None:
                conn.close()
        self._verify_after(st)
        health["wal_size_bytes"] = self.side_files().get("-wal", {}).get("size", 0)
        result["after"] = after_header.settings()
        result["health"] = health
        result["side_files"] = sorted(self.side_files())
        result["warnings"] = self.warnings
        return result

    def _verify_after(self, before: os.stat_result) -> None:
        now = os.stat(self.path)
        if (now.st_uid, now.st_gid, stat.S_IMODE(now.st_mode)) != (
            before.st_uid,
            before.st_gid,
            stat.S_IMODE(before.st_mode),
        ):
            raise SqliteError(
                f"SQLite database {self.given_path} changed owner or mode during the run "
                f"({before.st_uid}:{before.st_gid} {stat.S_IMODE(before.st_mode):04o} -> "
                f"{now.st_uid}:{now.st_gid} {stat.S_IMODE(now.st_mode):04o}). Another process touched it; restore "
                "the owner and mode."
            )
        self._check_side_files(now)


# ---- what the application's connections really use ------------------------------------------------------------
_SYNCHRONOUS = {"off": "0", "normal": "1", "full": "2", "extra": "3"}
_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"0", "off", "false", "no"}
_FLAGS = {"foreign_keys", "recursive_triggers", "cell_size_check"}
_STATUS_NAME = re.compile(r"^(?P<role>.+)-(?P<pid>\d+)\.json$")


def normalize_setting(name: str, value) -> str:
    """One spelling per value, so ``NORMAL`` == ``1`` for synchronous and ``on`` == ``true`` == ``1`` for flags."""
    text = str(value).strip().lower()
    if name == "synchronous" and text in _SYNCHRONOUS:
        return _SYNCHRONOUS[text]
    if isinstance(value, bool) or (name in _FLAGS and text in _TRUE | _FALSE):
        return "1" if text in _TRUE else "0"
    return text


class ConnectionStatus:
    """Reads the per-connection status files an application writes (``<role>-<pid>.json``, one JSON object each,
    the settings at the top level or under ``section``) and checks that every live connection reports the
    expected settings, written after ``newer_than``."""

    def __init__(
        self,
        status_dir: str,
        expect: dict,
        newer_than: float = 0.0,
        wait_s: float = 30.0,
        min_connections: int = 1,
        interval_s: float = 0.5,
        section: str = "",
    ):
        self.status_dir = status_dir
        self.section = section or ""
        self.expect = {str(k): normalize_setting(str(k), v) for k, v in (expect or {}).items()}
        self.newer_than = float(newer_than or 0.0)
        self.wait_s = float(wait_s)
        self.min_connections = int(min_connections)
        self.interval_s = float(interval_s)

    @staticmethod
    def _alive(pid: int) -> bool:
        return os.path.exists(f"/proc/{pid}")

    def snapshot(self) -> dict:
        """One look at the directory: live, stale (process gone), waiting (not rewritten since newer_than),
        mismatched connections."""
        report = {"connections": [], "stale": [], "waiting": [], "mismatched": [], "unreadable": []}
        try:
            names = sorted(os.listdir(self.status_dir))
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise SqliteError(
                f"Cannot read the application's status directory {self.status_dir}: {exc.strerror}. Point "
                "status_dir at the directory the application writes its <role>-<pid>.json files to, readable by "
                "the database owner (or set it empty to skip the check)."
            ) from exc
        for name in names:
            match = _STATUS_NAME.match(name)
            if not match:
                continue
            full = os.path.join(self.status_dir, name)
            pid = int(match.group("pid"))
            if not self._alive(pid):
                report["stale"].append(name)
                continue
            try:
                mtime = os.stat(full).st_mtime
                with open(full, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                # Being rewritten right now, or gone: look again on the next round.
                report["unreadable"].append(name)
                continue
            settings = data.get(self.section) if isinstance(data, dict) and self.section else data
            if not isinstance(settings, dict):
                report["unreadable"].append(name)
                continue
            if mtime < self.newer_than:
                report["waiting"].append(name)
                continue
            wrong = {
                key: {"expected": want, "actual": settings.get(key)}
                for key, want in self.expect.items()
                if key not in settings or normalize_setting(key, settings[key]) != want
            }
            entry = {"file": name, "role": match.group("role"), "pid": pid, "settings": settings}
            report["connections"].append(entry)
            if wrong:
                report["mismatched"].append({"file": name, "wrong": wrong})
        report["ok"] = (
            len(report["connections"]) >= self.min_connections
            and not report["waiting"]
            and not report["mismatched"]
            and not report["unreadable"]
        )
        return report

    def wait(self) -> dict:
        """Poll until every live connection reports the expected settings, or raise after wait_s."""
        started = time.monotonic()
        while True:
            report = self.snapshot()
            report["waited_s"] = round(time.monotonic() - started, 2)
            if report["ok"]:
                return report
            if time.monotonic() - started >= self.wait_s:
                break
            time.sleep(self.interval_s)
        if report["mismatched"]:
            first = report["mismatched"][0]
            wrong = ", ".join(f"{k}={v['actual']!r} (want {v['expected']!r})" for k, v in first["wrong"].items())
            why = f"{len(report['mismatched'])} connection(s) report other settings, e.g. {first['file']}: {wrong}"
        elif report["waiting"] or report["unreadable"]:
            late = len(report["waiting"]) + len(report["unreadable"])
            why = f"{late} status file(s) were not rewritten since the config changed or hold no settings"
        else:
            why = f"{len(report['connections'])} live connection(s) reported, fewer than {self.min_connections}"
        raise SqliteError(
            f"The application's connections do not use the configured settings after {self.wait_s:g} s in "
            f"{self.status_dir}: {why}. Check that the application was restarted and reads its config file."
        )
