"""``loupe serve DIR --ray [ADDRESS]``: the index served by Ray Serve deployments behind the Flask API.

``deploy(index_dir, RayServeConfig(...))`` deploys one searcher application per partition (a group of
shards, ``num_replicas`` each) and a batched query encoder, and opens the ingress ``RayEngine``;
``create_ray_app(deployment)`` is the usual Flask app over it. Importing this package does not import Ray.
"""

from server.ray_serve.deploy import RayDeployment, RayServeConfig, create_ray_app, deploy

__all__ = ["RayDeployment", "RayServeConfig", "create_ray_app", "deploy"]
