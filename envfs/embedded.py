"""The embedded default HSM: a SoftHSM2 token served by `p11-kit server`.

The token lives under `$XDG_DATA_HOME/envfs/softhsm/`. SoftHSM2 never runs
inside an envfs process that handles data: a `p11-kit server` child of the
daemon loads it and forks one `p11-kit-remote` per connection, and envfs
talks to it through `p11-kit-client.so` over a socket in a private (0700)
directory. The server child dies with the thread that started it
(PR_SET_PDEATHSIG), so a daemon killed with SIGKILL leaves no server behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import HsmError, TokenNotFound
from .secret import die_with_parent

TOKEN_LABEL = "envfs"
RUNTIME_PREFIX = "envfs-p11-"
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
CLIENT_MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)


def _first_existing(candidates: tuple[str, ...], package: str) -> str:
    for path in candidates:
        if os.path.exists(path):
            return path
    raise HsmError(f"{candidates[0]} not found: install the Debian package {package}")


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base).absolute() / "envfs"


class EmbeddedToken:
    """Paths and set-up of the embedded SoftHSM2 token."""

    def __init__(self, base: Path | None = None) -> None:
        self.directory = (base or data_dir()) / "softhsm"
        self.config = self.directory / "softhsm2.conf"
        self.tokens = self.directory / "tokens"

    def exists(self) -> bool:
        return self.tokens.is_dir() and any(self.tokens.iterdir())

    def check_config(self) -> None:
        """HsmError naming softhsm2.conf if it does not point SoftHSM2 at this
        token's directory (damaged or edited): SoftHSM2 itself would only
        answer with an error code."""
        try:
            lines = self.config.read_text(errors="replace").splitlines()
        except OSError as e:
            raise HsmError(f"{self.config}: {e.strerror}") from e
        settings = dict(line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
        tokendir = {k.strip(): v.strip() for k, v in settings.items()}.get("directories.tokendir")
        if tokendir != str(self.tokens):
            raise HsmError(f"{self.config}: damaged or edited: directories.tokendir must be {self.tokens}")

    def create(self, so_pin: str, user_pin: str) -> None:
        """Create the token directory and initialise the token in a helper process."""
        self.tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self.config.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        # SoftHSM2 must not be loaded into a long-lived envfs process: initialise
        # the token in a short-lived child that gets the PINs through a pipe.
        env = _server_environment(self.config)
        module = _first_existing(SOFTHSM_MODULE_CANDIDATES, "softhsm2")
        code = (
            "import sys\nfrom envfs.hsm import init_token\n"
            "so, user = sys.stdin.read().split('\\n')[:2]\n"
            f"init_token({module!r}, {TOKEN_LABEL!r}, so, user)\n"
        )
        result = subprocess.run(
            [_python(), "-c", code], input=f"{so_pin}\n{user_pin}\n", env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(self.tokens, ignore_errors=True)
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise HsmError(f"creating the embedded SoftHSM2 token failed: {lines[-1] if lines else '?'}")


def _server_environment(config: Path) -> dict[str, str]:
    """The token processes' environment: SoftHSM2's config, and never the PIN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVFS_", "P11_KIT_SERVER"))}
    env["SOFTHSM2_CONF"] = str(config)
    return env


def _accepts(socket_path: str) -> bool:
    """True once the server listens (it creates the socket file a little earlier)."""
    if not os.path.exists(socket_path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


def remove_stale_runtimes(min_age: float = 60.0) -> int:
    """Remove the socket directories of token servers that are gone; return how many.

    A daemon killed with SIGKILL cannot remove its server's directory (the
    server dies with it), so each start sweeps up what earlier ones left: a
    directory of ours, older than `min_age` seconds, whose socket no server
    listens on. A server that is starting has a young directory; one that
    runs answers on its socket.
    """
    removed = 0
    root = Path(tempfile.gettempdir())
    for runtime in root.glob(RUNTIME_PREFIX + "*"):
        try:
            info = runtime.lstat()
        except OSError:
            continue
        if info.st_uid != os.getuid() or not runtime.is_dir() or runtime.is_symlink():
            continue
        if time.time() - info.st_mtime < min_age or _accepts(str(runtime / "p11.sock")):
            continue
        shutil.rmtree(runtime, ignore_errors=True)
        removed += 1
    return removed


def _python() -> str:
    import sys

    return sys.executable


class TokenServer:
    """A `p11-kit server` process exposing the embedded token on a socket."""

    def __init__(self, token: EmbeddedToken) -> None:
        self.token = token
        self._process: subprocess.Popen[bytes] | None = None
        self._runtime: str | None = None
        self.client_module = _first_existing(CLIENT_MODULE_CANDIDATES, "p11-kit-modules")

    def start(self, timeout: float = 20.0) -> str:
        """Start the server and return the address for P11_KIT_SERVER_ADDRESS."""
        if not self.token.exists():
            raise TokenNotFound(f"no embedded token in {self.token.directory}: run 'envfs init' first")
        self.token.check_config()
        if shutil.which("p11-kit") is None:
            raise HsmError("p11-kit not found: install the Debian package p11-kit")
        module = _first_existing(SOFTHSM_MODULE_CANDIDATES, "softhsm2")
        remove_stale_runtimes()
        self._runtime = tempfile.mkdtemp(prefix=RUNTIME_PREFIX)
        socket_path = os.path.join(self._runtime, "p11.sock")
        env = _server_environment(self.token.config)
        log_path = os.path.join(self._runtime, "server.log")
        with open(log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                ["p11-kit", "server", "-f", "--provider", module, "-n", socket_path,
                 f"pkcs11:token={TOKEN_LABEL}"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                preexec_fn=lambda: die_with_parent(signal.SIGKILL), close_fds=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _accepts(socket_path):
            if self._process.poll() is not None:
                err = Path(log_path).read_text(errors="replace")
                self.stop()
                raise HsmError(f"p11-kit server exited: {err.strip().splitlines()[-1] if err.strip() else '?'}")
            if time.monotonic() > deadline:
                self.stop()
                raise HsmError("p11-kit server did not create its socket in time")
            time.sleep(0.01)
        os.chmod(socket_path, 0o600)
        return f"unix:path={socket_path}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        runtime, self._runtime = self._runtime, None
        if runtime:
            shutil.rmtree(runtime, ignore_errors=True)
