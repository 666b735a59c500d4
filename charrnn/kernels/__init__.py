"""Hand-written C kernels, built on first use (see charrnn/kernels/fp32.py)."""
