"""The Ray cluster a `--ray` run uses: Ray imported (lazily, or a one-line usage error),
connected quietly to an address, a running session or a new local one, and the plan of how the
model is spread over it (`Cluster`: one actor per GPU, or CPU actors leaving a CPU to decode).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ramcli.errors import UsageError
from ramcli.media.discover import os_reason

INSTALL = "--ray needs Ray: pip install 'ramcli[ray]'"


def import_ray():
    """Ray, or a one-line usage error (exit 2) naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL) from None
    return ray


def connect(address: str | None):
    """Ray, connected: to `address` ('auto' for the cluster this machine belongs to, or
    'ray://host:10001'), to a running session, or to a new local one. Quiet: ramcli's own
    progress bar and summary are the output."""
    ray = import_ray()
    if not ray.is_initialized():
        _reachable(address)
        try:
            starts = address is None and not os.environ.get("RAY_ADDRESS")  # a new local Ray: no dashboard
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                     **({"include_dashboard": False} if starts else {}))
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {one_line(exc)}") from None
        # log_to_driver=False silences the workers' output, but the driver's thread that prints the
        # cluster's error messages (an actor that died and is retried) writes them on stdout, where
        # the results go, and Ray has no public switch for it (LoggingConfig sets up loggers; this
        # is a print). So the private flag Ray's debugger uses; ramcli reports what failed itself.
        import ray._private.worker as worker

        if hasattr(worker, "_worker_logs_enabled"):
            worker._worker_logs_enabled = False
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the output in discovery order, as a local run
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures end in one RamcliError line
    return ray


def _reachable(address: str | None) -> None:
    """A `host:port` (or `ray://host:port`) that does not answer is a one-line error at once;
    Ray itself would retry for minutes."""
    import socket

    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # None, "auto", "local": Ray finds the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {os_reason(exc)}") from None


def one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


@dataclasses.dataclass
class Cluster:
    """How the model is spread: `actors` model actors of `cpus` CPUs and `gpus` GPUs each."""

    actors: int
    cpus: float
    gpus: float
    device: str  # the actors' --device


def plan(ray, device: str, actors: int | None, actor_cpus: float | None) -> Cluster:
    """One actor per GPU when the cluster has GPUs (and --device is not cpu); otherwise one CPU
    actor per node, each with all of the smallest node's CPUs but one (left to decode tasks)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU")
    if device == "mps":
        raise UsageError("--ray runs the model on CUDA or CPU actors (--device cpu, cuda or auto)")
    if gpus and device != "cpu":
        return Cluster(actors or gpus, actor_cpus or 1, 1, "cuda")
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [resources.get("CPU", 1)]
    cluster = Cluster(actors or len(nodes), actor_cpus or max(1, int(min(nodes)) - 1), 0, "cpu")
    if cluster.cpus > max(nodes):
        raise UsageError(f"--ray-actor-cpus {cluster.cpus:g}: no node of the Ray cluster has that many CPUs "
                         f"(the largest has {max(nodes):g})")
    if cluster.actors * cluster.cpus >= sum(nodes):
        raise UsageError(f"{cluster.actors} model actors of {cluster.cpus:g} CPUs take all {sum(nodes):g} CPUs of "
                         "the Ray cluster: leave at least one for decoding (fewer --ray-actors or --ray-actor-cpus)")
    return cluster
