"""The device side of a step: input packing, the model runner, CUDA graphs, KV-cache sizing
and the tensor-parallel worker ranks. Imports the step contract (``engine/step.py``), never
the scheduler."""
