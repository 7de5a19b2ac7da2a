"""Search spaces: what a genome means.

``genes`` (one gene range: bounds, discrete levels), ``merge_space`` (genome ↔ merge recipe),
``towers`` (a multimodal model's towers and layer stacks, from its parameter names),
``seed_recipes`` (M2N2's piecewise combinations of the experts), ``interpolation`` (the SLERP
coefficients strategies need, in numpy) and ``codec`` (one per population: genome → what a worker
applies). This package imports nothing on import, so a strategy that needs only the genes or the
SLERP coefficients does not pull in the merge kernels that ``merge_space`` declares against.
"""
