"""PyTorch side of yt8m-cma: data loading, models, training, evaluation."""
# TensorFlow (our record codec) loaded first and triton (pulled in by torch's first optimizer step) loaded second
# crash the process with a segfault; loading torch's compiler stack first avoids it. Every process that mixes the
# codec and training (tests, benches, the demo) imports `model` before `pipeline.records` touches TensorFlow.
import torch._dynamo  # noqa: F401
