"""Deploying ``loupe serve DIR --ray [ADDRESS]``: Serve applications + the Flask ingress in the driver.

Why Flask stays in the driver. Ray Serve's HTTP proxy speaks ASGI (``@serve.ingress`` takes a FastAPI
app); it has no WSGI adapter, and Loupe's API is a Flask (WSGI) app with its own limits, security and
error handling. So the driver runs that same app under waitress (``loupe serve``'s server) and calls
the deployments through ``DeploymentHandle``s, which Ray supports from any Ray driver; Serve's own
proxy is disabled (``proxy_location="Disabled"``). The ingress scales like any web tier: several
drivers (one per host) can front the same Serve applications.

Applications (each its own Serve app, so a partition is deployed, scaled and restarted alone):
``loupe-partition-<p>`` (``Searcher``, ``num_replicas`` each) and ``loupe-query-encoder``
(``QueryEncoder``). ``/api/search`` answers carry ``"partial"`` and ``"partitions"`` (which answered).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, request

from retrieval.errors import MissingExtraError
from retrieval.index import store
from server.ray_serve.partitions import begin_request, end_request, plan_partitions

log = logging.getLogger("loupe.ray_serve")

APP_PREFIX = "loupe-"


@dataclass
class RayServeConfig:
    address: str | None = None          # None / "local": start a local Ray cluster
    partitions: int = 2                 # searcher deployments (groups of shards)
    replicas: int = 1                   # num_replicas of each searcher deployment
    encoder_replicas: int = 1
    searcher_cpus: float = 1.0          # ray_actor_options num_cpus per searcher replica
    encoder_cpus: float = 1.0
    encoder_gpus: float = 0.0           # 1: the query encoder on a GPU
    timeout_s: float = 10.0             # a partition not answering within this is reported missing
    device: str = "auto"
    num_cpus: int | None = None         # local cluster only
    object_store_memory: int | None = None   # local cluster only (bytes)


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingExtraError("--ray needs the optional extra 'ray': pip install 'loupe-search[ray]'") from exc
    return ray, serve


def start_ray(address: str | None, *, num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Connect to ``address`` (or start a local cluster); True when this call started/connected Ray."""
    ray, _ = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
    if address and address != "local":
        kwargs["address"] = address
    else:
        kwargs.update({k: v for k, v in (("num_cpus", num_cpus), ("object_store_memory", object_store_memory))
                       if v is not None})
    ray.init(**kwargs)
    return True


class RayDeployment:
    """The deployed applications and the ingress engine; ``shutdown()`` deletes the applications."""

    def __init__(self, engine, app_names: list[str], started_ray: bool):
        self.engine, self.app_names, self.started_ray = engine, app_names, started_ray

    def shutdown(self) -> None:
        ray, serve = _ray()
        if not ray.is_initialized():
            return
        for name in self.app_names:
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("could not delete Serve application %s", name)
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()


def deploy(index_dir, cfg: RayServeConfig) -> RayDeployment:
    """Start (or join) Ray and Serve, deploy the searchers and the query encoder for ``index_dir``, and
    open the ingress ``RayEngine`` over them."""
    from retrieval.encoders import get_spec
    from server.ray_serve.deployments import QueryEncoder, Searcher
    from server.ray_serve.engine import RayEngine

    _, serve = _ray()
    index_dir = Path(index_dir).expanduser().resolve()
    manifest = store.read_manifest(index_dir)
    started = start_ray(cfg.address, num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory)
    serve.start(proxy_location="Disabled")
    partitions = plan_partitions(manifest, cfg.partitions)
    manifest_json = manifest.to_json()
    searcher_cpus, encoder_cpus = _fit_cpus(cfg, len(partitions))
    handles, names = [], []
    try:
        for p in partitions:
            name = f"{APP_PREFIX}partition-{p.number}"
            app = Searcher.options(num_replicas=max(1, cfg.replicas),
                                   ray_actor_options={"num_cpus": searcher_cpus}
                                   ).bind(str(index_dir), manifest_json, p)
            names.append(name)
            handles.append(serve.run(app, name=name, route_prefix=None))
            log.info("deployed %s: shards %s (%d images) x %d replica(s)", name, ", ".join(p.shards),
                     sum(p.counts), cfg.replicas)
        specs = {n: get_spec(n) for n in manifest.encoders if manifest.encoders[n].supports_text}
        names.append(f"{APP_PREFIX}query-encoder")
        encoder = serve.run(QueryEncoder.options(num_replicas=max(1, cfg.encoder_replicas),
                                                 ray_actor_options={"num_cpus": encoder_cpus,
                                                                    "num_gpus": cfg.encoder_gpus}
                                                 ).bind(specs, "cuda" if cfg.encoder_gpus else cfg.device),
                            name=names[-1], route_prefix=None)
        engine = RayEngine(index_dir, partitions=partitions, handles=handles, encoder_handle=encoder,
                           device=cfg.device, timeout_s=cfg.timeout_s)
    except BaseException:
        RayDeployment(None, names, started).shutdown()
        raise
    return RayDeployment(engine, names, started)


def _fit_cpus(cfg: RayServeConfig, partitions: int) -> tuple[float, float]:
    """Each replica's logical CPUs; scaled down (with a warning) when the cluster has fewer than they ask,
    so that every replica can start (a small machine with ``--ray`` and no ADDRESS)."""
    ray, _ = _ray()
    need = partitions * max(1, cfg.replicas) * cfg.searcher_cpus + max(1, cfg.encoder_replicas) * cfg.encoder_cpus
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if need <= have or need <= 0 or have <= 0:
        return cfg.searcher_cpus, cfg.encoder_cpus
    scale = have / need
    log.warning("the Ray cluster has %.1f CPUs and the replicas ask for %.1f; giving each %.0f%% of its request",
                have, need, scale * 100)
    return cfg.searcher_cpus * scale, cfg.encoder_cpus * scale


def create_ray_app(deployment: RayDeployment, config: dict | None = None) -> Flask:
    """The usual Flask app (``server.app.create_app``) over the deployment's engine, with every
    ``/api/search`` answer saying which partitions answered (``"partial"``, ``"partitions"``)."""
    from server.app import create_app

    engine = deployment.engine
    app = create_app({"RELOAD_INTERVAL": 0, "PRELOAD_ENCODERS": False, "WARM_CLASSIFIER": False,
                      **(config or {})}, engine=engine)
    total = len(engine.shards.partitions)

    @app.before_request
    def _coverage_start():
        begin_request(total)

    @app.after_request
    def _coverage_report(resp):
        cov = end_request()
        if cov is not None and request.path == "/api/search" and resp.is_json and resp.status_code == 200:
            body = resp.get_json()
            body.update(cov.to_json())
            resp.set_data(app.json.dumps(body))
        return resp

    return app
