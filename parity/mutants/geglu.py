from . import Mutant

MUTANTS = [
    Mutant("geglu", "tanh_for_exact", "the tanh approximation used where exact (erf) GELU was asked, in the forward",
           old="y = x * 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))",
           new="y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * SQRT_2_OVER_PI * (x + KAPPA * (x * x * x))) + 1.0))"),
    Mutant("geglu", "exact_grad_pdf_dropped", "exact GELU derivative taken as Phi(x), the x * phi(x) term dropped",
           old="d = cdf + x * pdf", new="d = cdf"),
    Mutant("geglu", "tanh_grad_cubic_term_dropped", "tanh-GELU derivative misses the 3 kappa x^2 of dz/dx",
           old="dz = SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * x_sq)", new="dz = SQRT_2_OVER_PI"),
    Mutant("geglu", "d_up_uses_gate", "d_up multiplies dy by gate instead of gelu(gate)",
           old="tl.store(DU + idx, (dy * _gelu(g, TANH, EXACT)).to(DU.dtype.element_ty), mask=mask)",
           new="tl.store(DU + idx, (dy * g).to(DU.dtype.element_ty), mask=mask)"),
    Mutant("geglu", "backward_ignores_approximate", "the backward always uses the exact derivative",
           old='dgate, dup, h_out,\n                            TANH=approximate == "tanh")',
           new='dgate, dup, h_out,\n                            TANH=False)'),
]
