"""What only CPUs run: the native attention kernel's build and loading (kernels.py, csrc/), oneDNN GEMMs on
prepacked weights (packed_linear.py), one GEMM for q/k/v and epilogue-fused SwiGLU MLPs (fused_projections.py),
the swap of a loaded model's modules for them (linears.py), and helper threads kept off the engine's OpenMP
team (threads.py). The engine asks for them at start-up and runs without them elsewhere."""
