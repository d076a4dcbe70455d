"""Where a run is carried out (`--executor local|ray` and the Ray options), checked without torch or ray.

Everything a user can get wrong here is answered before any data or model is read: an unknown
executor, Ray options given to the local executor, worker counts out of range, Ray not installed, an
address that is not `auto` or `host:port` (a Ray client `ray://` address cannot carry the streams of
rows), and (for a `host:port` address) nothing listening there."""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass

from ..errors import ExecutorError, OptionError

EXECUTORS = ("local", "ray")
MAX_WORKERS = 4096
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ExecutorSpec:
    """`executor`: local (this process, today's behaviour) or ray. With ray: `address` None starts a
    local Ray on this machine, `auto` joins the cluster this machine belongs to, `host:port` joins that one; `workers` actors each load the model once and use
    `cpus_per_worker` CPU threads (and `gpus_per_worker` GPUs); a task whose worker dies is given to a
    worker again up to `max_retries` times."""

    executor: str = "local"
    address: str | None = None
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_retries: int = 3

    @property
    def is_ray(self) -> bool:
        return self.executor == "ray"

    def describe(self) -> str:
        where = "a local Ray on this machine" if self.address is None else f"the Ray cluster at {self.address}"
        return f"{self.workers} worker(s) on {where}"


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_executor(spec: ExecutorSpec, *, defaults: ExecutorSpec = ExecutorSpec()) -> ExecutorSpec:
    """Validate `spec` (raises `OptionError` / `ExecutorError`); returns it with the address normalised."""
    if spec.executor not in EXECUTORS:
        raise OptionError(f"unknown --executor {spec.executor!r}; use one of {', '.join(EXECUTORS)}")
    if not spec.is_ray:
        given = [name for name, value, default in (
            ("--ray-address", spec.address, defaults.address), ("--workers", spec.workers, defaults.workers),
            ("--cpus-per-worker", spec.cpus_per_worker, defaults.cpus_per_worker),
            ("--max-retries", spec.max_retries, defaults.max_retries)) if value != default]
        if given:
            raise OptionError(f"{', '.join(given)} apply to --executor ray only; add --executor ray")
        return spec
    if not 1 <= spec.workers <= MAX_WORKERS:
        raise OptionError(f"--workers must be between 1 and {MAX_WORKERS}, got {spec.workers}")
    if not 1 <= spec.cpus_per_worker <= 1024:
        raise OptionError(f"--cpus-per-worker must be between 1 and 1024, got {spec.cpus_per_worker}")
    if not 0 <= spec.gpus_per_worker <= 64:
        raise OptionError(f"GPUs per worker must be between 0 and 64, got {spec.gpus_per_worker}")
    if not 0 <= spec.max_retries <= 100:
        raise OptionError(f"--max-retries must be between 0 and 100, got {spec.max_retries}")
    if not ray_installed():
        raise ExecutorError("--executor ray needs the `ray` package: pip install 'editlab[ray]' "
                            "(on this machine and on every node of the cluster)")
    address = normalise_address(spec.address)
    if address is not None and address != "auto":
        check_reachable(address)
    return ExecutorSpec(spec.executor, address, spec.workers, spec.cpus_per_worker, spec.gpus_per_worker, spec.max_retries)


def normalise_address(address: str | None) -> str | None:
    """None/"" (start a local Ray), "auto" or "host:port"; anything else (a Ray client ray:// address too) raises."""
    if address is None or not address.strip():
        return None
    address = address.strip()
    if address == "auto":
        return address
    if address.startswith("ray://"):
        # Ray client cannot carry actor generators, which is how rows stream back to the driver
        raise OptionError(f"--ray-address {address}: a Ray client address cannot stream rows back; run editlab on a "
                          "node of the cluster with --ray-address auto (or the head's host:port)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise OptionError(f"--ray-address {address!r}: use auto (the cluster this machine belongs to) or host:port "
                          "(the head's GCS port, usually 6379)")
    return address


# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers
# with a SETTINGS frame of its own (frame header: 3 bytes length, type 0x4, flags, stream 0)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A Ray cluster's GCS answers at the address's host and port: it accepts a TCP connection and
    speaks gRPC (HTTP/2). A quick answer instead of Ray's connection retries, which never end where
    another service holds the port."""
    host, _, port = address.rpartition(":")
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ExecutorError(f"cannot reach a Ray cluster at {address} ({reason}); start it with "
                            "`ray start --head` there, or check the host and port") from None
    if os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true"):
        conn.close()  # a TLS cluster does not answer a plaintext handshake; Ray's own connection says more
        return
    header = b""
    with conn:
        try:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:  # a timeout, or the connection reset: nothing answered as gRPC does
            pass
    if len(header) < 9 or header[3] != 0x04:
        raise ExecutorError(f"something answers at {address} but not as a Ray cluster (no gRPC answer within "
                            f"{timeout:g} s); give the address `ray start --head` printed (port 6379 by default)")


def local_cpus() -> int:
    return os.cpu_count() or 1
