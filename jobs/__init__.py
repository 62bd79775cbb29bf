"""The jobs (thin entry points); installed as ``mama_ray.jobs`` for the ``mama-*`` console scripts."""
