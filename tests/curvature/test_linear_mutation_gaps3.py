"""Exact answers for the fp64 basis arithmetic of the Krylov kernels that the other tests
left open (mutation testing, session 25: sharpscope/curvature/_linear.py)."""

from __future__ import annotations

import torch

from sharpscope.curvature._linear import orthogonalize

F64 = torch.float64


# kills: orthogonalize with passes=1 for the documented 2 (_linear.py:523; "twice is
# enough", Giraud et al. 2005). w = 1e8·q₀ + f with f ⟂ span(Q): one classical
# Gram-Schmidt pass leaves a component along Q of about ‖w‖·eps·√P (~1e-7 of the
# remainder's norm), a second pass removes it to rounding of the remainder (< 1e-13).
def test_two_gram_schmidt_passes_orthogonalize_a_vector_nearly_in_the_span():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(2000, 4, generator=gen, dtype=F64))
    Q, f = basis[:, :3].T.contiguous(), basis[:, 3]
    w = 1e8 * Q[0] + 3e7 * Q[2] + f
    r = orthogonalize(w, Q)
    assert float((Q @ r).abs().max() / r.norm()) < 1e-13
    torch.testing.assert_close(r, f, rtol=0, atol=1e-6)


# kills: LinearOperator.mm counting 1 product instead of one per row (_linear.py:65).
# num_matvecs is the operator's public count of products (a block of s rows is s).
def test_linear_operator_counts_one_product_per_row():
    from sharpscope.curvature._linear import as_operator

    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    op = as_operator(A)
    assert op.num_matvecs == 0
    torch.testing.assert_close(
        op.mv(torch.ones(3, dtype=F64)), torch.tensor([1.0, 2, 3], dtype=F64)
    )
    torch.testing.assert_close(op.mm(torch.eye(3, dtype=F64)[:2]), A[:2])
    assert op.num_matvecs == 3
