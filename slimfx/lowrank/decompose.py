"""Low-rank factorizations of conv and linear weights: pure tensor math, no modules.

Each function returns the factor weights of a sequence of smaller layers whose composition
equals (at full rank) or approximates the original weight. Errors are relative Frobenius
norms of the reconstructed weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the squared total."""
    squared = singular_values.double() ** 2
    total = float(squared.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squared, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1


def tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young)."""
    squared = singular_values.double() ** 2
    total = float(squared.sum())
    return math.sqrt(float(squared[rank:].sum()) / total) if total else 0.0


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``matrix`` from the eigenvectors of its smaller Gram matrix.

    About twice as fast as ``torch.linalg.svd`` on the square-ish matrices convs give, and
    the factors still multiply back to ``matrix`` at full rank (``U U^T = I``).
    """
    tall = matrix.shape[0] >= matrix.shape[1]
    m = matrix.T if tall else matrix
    eigenvalues, vectors = torch.linalg.eigh(m @ m.T)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    s = eigenvalues.clamp_min(0).sqrt()
    other = (m.T @ vectors) / s.clamp_min(float(s[0]) * 1e-7 if len(s) and s[0] > 0 else 1e-30)
    return (other, s, vectors.T) if tall else (vectors, s, other.T)


# -- spatial SVD: kxk -> kx1 + 1xk -----------------------------------------------------------------
def spatial_svd_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> the (Cin*kh) x (Cout*kw) matrix whose rank spatial SVD cuts."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_svd(
    weight: torch.Tensor, rank: int, decomposition: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical (rank, Cin, kh, 1) and horizontal (Cout, rank, 1, kw) conv weights.

    ``decomposition`` is ``torch.linalg.svd`` of ``spatial_svd_matrix(weight)`` when the
    caller already has it (it is the expensive part).
    """
    cout, cin, kh, kw = weight.shape
    u, s, vh = decomposition or torch.linalg.svd(spatial_svd_matrix(weight), full_matrices=False)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, cin, kh, 1)
    horizontal = (root[:, None] * vh[:rank]).reshape(rank, cout, 1, kw).permute(1, 0, 2, 3)
    return vertical.to(weight.dtype).contiguous(), horizontal.to(weight.dtype).contiguous()


def compose_spatial(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The (Cout, Cin, kh, kw) weight a vertical-then-horizontal pair computes."""
    return torch.einsum("ocj,cki->okij", horizontal[:, :, 0, :], vertical[:, :, :, 0])


# -- Tucker-2: 1x1 -> kxk -> 1x1 -------------------------------------------------------------------
@dataclass(frozen=True)
class Tucker2:
    first: torch.Tensor  # (r_in, Cin, 1, 1)
    core: torch.Tensor  # (r_out, r_in, kh, kw)
    last: torch.Tensor  # (Cout, r_out, 1, 1)


def mode_singular_values(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding (0: output channels, 1: input channels)."""
    eigenvalues = torch.linalg.eigvalsh(_gram(weight, mode))
    return eigenvalues.flip(0).clamp_min(0).sqrt()


def tucker2(weight: torch.Tensor, rank_in: int, rank_out: int, iterations: int = 0) -> Tucker2:
    """Tucker-2 on the channel modes: HOSVD start, then ``iterations`` of HOOI refinement."""
    w = weight.double()
    u_out = _leading(_unfold(w, 0), rank_out)
    u_in = _leading(_unfold(w, 1), rank_in)
    for _ in range(iterations):
        u_out = _leading(_unfold(torch.einsum("oikl,ir->orkl", w, u_in), 0), rank_out)
        u_in = _leading(_unfold(torch.einsum("oikl,or->rikl", w, u_out), 1), rank_in)
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    dtype = weight.dtype
    return Tucker2(
        u_in.T[:, :, None, None].to(dtype).contiguous(),
        core.to(dtype).contiguous(),
        u_out[:, :, None, None].to(dtype).contiguous(),
    )


def compose_tucker2(t: Tucker2) -> torch.Tensor:
    return torch.einsum("or,rskl,si->oikl", t.last[:, :, 0, 0], t.core, t.first[:, :, 0, 0])


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _gram(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    unfolded = _unfold(tensor.double(), mode)
    return unfolded @ unfolded.T


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading left singular vectors, from the (small) Gram matrix's eigenvectors."""
    _, vectors = torch.linalg.eigh(matrix @ matrix.T)
    return vectors.flip(1)[:, :rank]


# -- CP: pointwise -> depthwise kx1 -> depthwise 1xk -> pointwise ----------------------------------
@dataclass(frozen=True)
class CP:
    out_factor: torch.Tensor  # (Cout, R)
    in_factor: torch.Tensor  # (Cin, R)
    vertical: torch.Tensor  # (kh, R)
    horizontal: torch.Tensor  # (kw, R)
    fit_error: float  # relative error of the reconstructed kernel


def cp_als(weight: torch.Tensor, rank: int, iterations: int = 200, seed: int = 0, tolerance: float = 1e-10) -> CP:
    """CP decomposition of a 4-way kernel by alternating least squares (Lebedev et al. 2015).

    Deterministic for a seed: factors start from a seeded random draw, and each sweep solves
    one factor exactly given the others; stops when the fit changes less than ``tolerance``.
    The fit is tracked from Gram matrices, never by rebuilding the kernel.
    """
    w = weight.double()
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(dim, rank, generator=generator, dtype=torch.float64) for dim in w.shape]
    norm_squared = float((w * w).sum())
    error, previous = 1.0, math.inf
    for _ in range(iterations):
        for mode in range(4):
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for m in range(4):
                if m != mode:
                    gram = gram * (factors[m].T @ factors[m])
            product = _mttkrp(w, factors, mode)
            factors[mode] = torch.linalg.lstsq(gram, product.T).solution.T
        # after the last mode: ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2
        inner = float((product * factors[3]).sum())
        model_squared = float((gram * (factors[3].T @ factors[3])).sum())
        error = math.sqrt(max(norm_squared - 2 * inner + model_squared, 0.0) / norm_squared) if norm_squared else 0.0
        if abs(previous - error) < tolerance:
            break
        previous = error
    out_factor, in_factor, vertical, horizontal = (f.to(weight.dtype) for f in _balanced(factors))
    return CP(out_factor, in_factor, vertical, horizontal, error)


def compose_cp(
    out_factor: torch.Tensor, in_factor: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor
) -> torch.Tensor:
    return torch.einsum("or,ir,kr,lr->oikl", out_factor, in_factor, vertical, horizontal)


def _mttkrp(w: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """The kernel times every factor but ``mode``'s: a channel mode is contracted first, so
    intermediates stay the size of one channel mode x kernel x rank."""
    a, b, c, d = factors
    if mode == 0:
        return torch.einsum("oklr,kr,lr->or", torch.einsum("oikl,ir->oklr", w, b), c, d)
    through_out = torch.einsum("oikl,or->iklr", w, a)
    if mode == 1:
        return torch.einsum("iklr,kr,lr->ir", through_out, c, d)
    if mode == 2:
        return torch.einsum("iklr,ir,lr->kr", through_out, b, d)
    return torch.einsum("iklr,ir,kr->lr", through_out, b, c)


def _balanced(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each component's scale evenly over its four factors (better conditioned layers)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
    scale = norms.prod(0).clamp_min(1e-300) ** 0.25
    return [f / n.clamp_min(1e-300) * scale for f, n in zip(factors, norms)]


# -- separable 3-D: kxkxk -> 1x1xk + 1xkx1 + kx1x1 -------------------------------------------------
@dataclass(frozen=True)
class Separable3d:
    width: torch.Tensor  # (r1, Cin, 1, 1, kw)
    height: torch.Tensor  # (r2, r1, 1, kh, 1)
    depth: torch.Tensor  # (Cout, r2, kd, 1, 1)


def separable_first_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the (Cin*kw) x (Cout*kd*kh) matrix whose rank the width kernel cuts."""
    cout, cin, kd, kh, kw = weight.shape
    return thin_svd(weight.permute(1, 4, 0, 2, 3).reshape(cin * kw, cout * kd * kh))


def separable_second_svd(
    weight: torch.Tensor, rank_width: int, first: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the (r1*kh) x (Cout*kd) matrix left once the width kernel is split off."""
    cout, cin, kd, kh, kw = weight.shape
    _, s1, vh1 = first
    rest = (s1[:rank_width, None] * vh1[:rank_width]).reshape(rank_width, cout, kd, kh)
    return thin_svd(rest.permute(0, 3, 1, 2).reshape(rank_width * kh, cout * kd))


def separable_3d(
    weight: torch.Tensor, rank_width: int, rank_height: int, first: tuple[torch.Tensor, ...] | None = None
) -> Separable3d:
    """Successive SVDs: split off the width kernel, then the height kernel from the rest."""
    cout, cin, kd, kh, kw = weight.shape
    first = first or separable_first_svd(weight)
    u2, s2, vh2 = separable_second_svd(weight, rank_width, first)
    rank_height = min(rank_height, len(s2))
    width = first[0][:, :rank_width].T.reshape(rank_width, cin, 1, 1, kw)
    height = u2[:, :rank_height].T.reshape(rank_height, rank_width, 1, kh, 1)
    depth = (s2[:rank_height, None] * vh2[:rank_height]).reshape(rank_height, cout, kd).permute(1, 0, 2)
    dtype = weight.dtype
    return Separable3d(
        width.to(dtype).contiguous(),
        height.to(dtype).contiguous(),
        depth.reshape(cout, rank_height, kd, 1, 1).to(dtype).contiguous(),
    )


def compose_separable_3d(s: Separable3d) -> torch.Tensor:
    return torch.einsum("omd,mrh,rcw->ocdhw", s.depth[:, :, :, 0, 0], s.height[:, :, 0, :, 0], s.width[:, :, 0, 0, :])


# -- linear SVD ------------------------------------------------------------------------------------
def linear_svd(
    weight: torch.Tensor, rank: int, decomposition: tuple[torch.Tensor, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, in) and (out, rank) weights whose product is the best rank-``rank`` ``weight``."""
    u, s, vh = decomposition or thin_svd(weight.double())
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)
