"""Distributed pretraining: the worker loop, DeepSpeed wiring, writing checkpoints, metrics.

Everything that knows about Ray Train or DeepSpeed lives here (models and losses know neither).
The loop (:mod:`mama_ray.train.loop`) is written against a small context
(:mod:`mama_ray.train.context`) so the same code runs under Ray Train and in a plain local test;
:mod:`mama_ray.train.launch` builds the ``TorchTrainer`` that :mod:`mama_ray.driver` and Ray Tune
start. What a checkpoint folder holds and how it is read back is :mod:`mama_ray.layout`.
"""
