"""Ray Tune sweeps; installed as ``mama_ray.tune`` for the ``mama-sweep`` console script."""
