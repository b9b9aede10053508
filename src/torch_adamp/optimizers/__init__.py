"""The projected optimizers: one module each, holding its options, its rule (the direction, in the
per-tensor and multi-tensor forms), its ``torch.optim.Optimizer`` class and its functional API."""
