"""What only CPUs run: the native attention kernel's build and loading (kernels.py, csrc/) and oneDNN GEMMs on
prepacked weights (packed_linear.py). The engine asks for them at start-up and runs without them elsewhere."""
