"""mama-ray: cluster-scale MaMA pretraining for mammography on Ray Data, Ray Train + DeepSpeed and Ray Tune."""

__version__ = "0.1.0"
