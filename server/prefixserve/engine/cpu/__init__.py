"""What only CPUs run: the native attention kernel's build and loading (kernels.py, csrc/) and oneDNN GEMMs on
prepacked weights (packed_linear.py), one GEMM for q/k/v and one for gate/up (fused_projections.py). The engine asks for them at start-up and runs without them elsewhere."""
