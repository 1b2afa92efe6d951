"""Claims of the sequence tasks and causal constructions (mesa paper, arXiv 2309.05858;
issue #16, sequence half): the data sampler (orthogonal, Haar, clipping, the recursion),
causal Prop. 1 (one causal LSA layer = one GD step on L_t, any Phi_0), Prop. 2
(Neumann / Richardson preconditioning stacks within their geometric bounds at every
iteration; the code's Chebyshev coefficients measured against exact ridge), the
baselines per time step, and the hand-written backward of the sequence loss.

Expected numbers come from the loop-level helpers below (explicit sums over sequences,
time steps and earlier tokens, one ``numpy.linalg`` solve per token), never from the
vectorised code under test. ``tests/test_sequences.py`` uses the same helpers and shows
that each can fail.
"""

import numpy as np

import reference as R
from reference import causal_constructions as CC
from reference import sequences as S
from reference.gradcheck import check_gradients
from reference.tolerances import tolerance

from .registry import Outcome, claim

SRC = "von Oswald et al. 2023b (arXiv 2309.05858)"


# --------------------------------------------------------------------------------
# Loop-level helpers (independent of reference.sequences / causal_constructions)
# --------------------------------------------------------------------------------

def loop_prev(X, b, t):
    """x_{t-1} of sequence b (0 for t = 0)."""
    return np.zeros(X.shape[2]) if t == 0 else X[b, t - 1]


def loop_causal_gd(X, eta, Phi_0=None):
    """Phi_1(t) x_t, Phi_1(t) = Phi_0 + eta sum_{t'<=t} (x_t' - Phi_0 x_t'-1) x_t'-1^T, by loops."""
    B, T, d = X.shape
    P0 = np.zeros((d, d)) if Phi_0 is None else np.asarray(Phi_0, np.float64)
    out = np.zeros((B, T, d))
    for b in range(B):
        for t in range(T):
            Phi = P0.copy()
            for tp in range(t + 1):
                xp = loop_prev(X, b, tp)
                Phi += eta * np.outer(X[b, tp] - P0 @ xp, xp)
            out[b, t] = Phi @ X[b, t]
    return out


def loop_system(X, b, t, ridge):
    """(A_t, M_t) of sequence b by explicit sums over t' <= t."""
    d = X.shape[2]
    A, M = ridge * np.eye(d), np.zeros((d, d))
    for tp in range(t + 1):
        xp = loop_prev(X, b, tp)
        A += np.outer(xp, xp)
        M += np.outer(X[b, tp], xp)
    return A, M


def loop_ridge(X, ridge=CC.RIDGE):
    """M_t A_t^{-1} x_t per token by loops and one solve each."""
    B, T, d = X.shape
    out = np.zeros((B, T, d))
    for b in range(B):
        for t in range(T):
            A, M = loop_system(X, b, t, ridge)
            out[b, t] = M @ np.linalg.solve(A, X[b, t])
    return out


def loop_richardson(A, x, omegas):
    """Iterates u_1 .. u_{len(omegas)} of u_{k+1} = u_k + omega_k (x - A u_k) from u_0 = 0."""
    u, out = np.zeros_like(x), []
    for w in omegas:
        u = u + w * (x - A @ u)
        out.append(u)
    return out


def loop_chebyshev(A, alphas, betas, nu):
    """The code's recursion with normaliser nu (the code: nu = ||A||_F): inverses after 0..K steps."""
    d = A.shape[0]
    An, eye = A / nu, np.eye(d)
    inv, term, prev = eye.copy(), eye.copy(), eye.copy()
    out = [inv / nu]
    for a, b in zip(alphas, betas):
        term = term @ (eye - a * An)
        mom = b * (inv - prev)
        prev, inv = inv, inv + term + mom
        out.append(inv / nu)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _seqs(rng, B, T, d=10, variant="linear"):
    return S.SequenceSpec(variant, T=T, d=d, d_obs=d if variant != "partial" else None).sample(rng, B)


# --------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------

@claim("sequences.sampler.orthogonal", source=f"{SRC}, Sec. 4 (data)",
       statement="Every sampled transition W of the linear, partially observed, nonlinear and fixed-teacher variants is "
                 "orthogonal: max |W^T W - I| within float64 rounding",
       method="2,000 matrices per variant (d = 10; 15 hidden for partial), float64, worst entry of W^T W - I")
def _(ctx):
    worst = 0.0
    for i, v in enumerate(("linear", "partial", "nonlinear", "fixed")):
        W = S.SequenceSpec(v, T=1).sample(ctx.rng(200 + i), 2000).W
        worst = max(worst, float(np.abs(np.einsum("bji,bjk->bik", W, W) - np.eye(W.shape[1])).max()))
    return Outcome.at_most(worst, 1e-12, "Householder QR is backward stable: orthogonality to a few ulps times d")


@claim("sequences.sampler.haar", source=f"{SRC}, Sec. 4 (W Haar-random orthogonal)",
       statement="The sampled W are Haar distributed on O(10): the trace moments E tr W = 0, E (tr W)^2 = 1 and "
                 "E tr W^2 = 1 of the Haar measure (Diaconis-Shahshahani) hold; a QR without the sign fix fails them",
       method="20,000 matrices (80,000 in full mode); measured = the largest |z| score (sample mean minus the Haar "
              "value, over its standard error) of the three statistics; details hold the same score for a plain QR")
def _(ctx):
    B = 80_000 if ctx.full else 20_000

    def zmax(W):
        tr = np.trace(W, axis1=1, axis2=2)
        tr2 = np.einsum("bij,bji->b", W, W)
        stats = [(tr, 0.0), (tr * tr, 1.0), (tr2, 1.0)]
        return max(abs(s.mean() - m) / (s.std() / np.sqrt(len(s))) for s, m in stats)

    z = zmax(S.SequenceSpec("linear", T=1).sample(ctx.rng(210), B).W)
    plain = np.linalg.qr(ctx.rng(211).standard_normal((B, 10, 10)))[0]
    return Outcome.at_most(z, 5.0, "three z scores of a correct sampler exceed 5 with probability < 2e-6",
                           plain_qr_z=float(zmax(plain)))


@claim("sequences.sampler.recursion", source=f"{SRC}, Sec. 4 and the official data generators",
       statement="Each variant's states follow their recursion (h_{t+1} = clip(W f(h_t) + 0.01 eps)), the clip level is "
                 "respected (10; contracting 2; nonlinear unclipped), targets are the next observations, the "
                 "contracting W has the drawn spectrum (nine in [0.3, 0.9] and one 0.9) and the nonlinear f has unit norm",
       method="per variant 6 sequences of T = 30 re-simulated by loops from the same draws (W, h_1 and the noise "
              "re-drawn in the documented order); worst relative difference of states and observations; clip and "
              "spectrum checks count as infinite when violated")
def _(ctx):
    worst = 0.0
    for i, v in enumerate(S.VARIANTS):
        spec = S.SequenceSpec(v, T=30)
        s = spec.sample(ctx.rng(220 + i), 6)
        r = ctx.rng(220 + i)                                           # the same stream, re-drawn by hand
        B, d, T = 6, spec.d, spec.T
        if v == "fixed":
            W = s.W
        elif v == "contracting":
            U = r.standard_normal((B, d, d))
            lam = r.permuted(np.concatenate([r.uniform(0.3, 0.9, (B, d - 1)), np.full((B, 1), 0.9)], 1), axis=1)
            W = np.stack([U[b] @ np.diag(lam[b]) @ np.linalg.inv(U[b]) for b in range(B)])
            ev = np.sort(np.linalg.eigvals(s.W).real, axis=1)
            if not (np.allclose(ev, np.sort(lam, 1), atol=1e-8) and np.all(np.isclose(ev.max(1), 0.9))):
                worst = np.inf
        else:
            G = r.standard_normal((B, d, d))
            W = np.zeros((B, d, d))
            for b in range(B):
                Q, Rm = np.linalg.qr(G[b])
                for j in range(d):
                    W[b, :, j] = Q[:, j] * (1.0 if Rm[j, j] >= 0 else -1.0)
        h0 = r.uniform(-spec.init_range, spec.init_range, (B, d))
        eps = r.standard_normal((B, T, d))
        A_m, B_m = S.nonlinear_mlp(spec.mlp_seed, d) if v == "nonlinear" else (None, None)
        Hs = np.zeros((B, T + 1, d))
        for b in range(B):
            h = h0[b]
            Hs[b, 0] = h
            for t in range(T):
                if v == "nonlinear":
                    z = h @ A_m
                    g = (0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))) @ B_m
                    if abs(np.linalg.norm(g / np.linalg.norm(g)) - 1) > 1e-12:
                        worst = np.inf
                    h = W[b] @ (g / np.linalg.norm(g)) + spec.noise_std * eps[b, t]
                else:
                    h = W[b] @ h + spec.noise_std * eps[b, t]
                if spec.clip is not None:
                    h = np.minimum(np.maximum(h, -spec.clip), spec.clip)
                Hs[b, t + 1] = h
        C = 0.5 * r.standard_normal((B, spec.d_obs, d)) if v == "partial" else np.broadcast_to(np.eye(d), (B, d, d))
        O = np.einsum("bij,btj->bti", C, Hs)
        if spec.obs_noise_std > 0:
            O = O + spec.obs_noise_std * r.standard_normal(O.shape)
        if spec.clip is not None and np.abs(s.H).max() > spec.clip:
            worst = np.inf
        if not np.array_equal(s.X[:, 1:], s.Y[:, :-1]):
            worst = np.inf
        worst = max(worst, _rel(s.H, Hs), _rel(s.X, O[:, :T]), _rel(s.Y, O[:, 1:]))
    tol = tolerance(np.float64, "algebra")
    return Outcome.at_most(worst, 1e-10, "the same draws through another summation order; contracting W = U diag U^-1 "
                           f"inverts U (condition up to ~1e3) so 1e-10 instead of the algebra rtol {tol.rtol:g}")


# --------------------------------------------------------------------------------
# Causal Prop. 1
# --------------------------------------------------------------------------------

@claim("causal.prop1.float64", source=f"{SRC}, Prop. 1",
       statement="One causal LSA layer with the Prop. 1 weights puts Phi_1(t) x_t into the first slot of every token t, "
                 "Phi_1(t) one GD step from Phi_0 on L_t(Phi) = 1/2 sum_{t'<=t} ||x_t' - Phi x_t'-1||^2 (no 1/t), for "
                 "any Phi_0 (spec layout) and Phi_0 = 0 on the code's 40-wide layout with its input masking; the other "
                 "slots are unchanged",
       method="random (d, T, eta, Phi_0) configurations (d 1..6, T 1..12), float64; layer output vs the loop-level GD "
              "of every token; worst relative error")
def _(ctx):
    rng = ctx.rng(230)
    worst, n = 0.0, 40 if ctx.full else 16
    for i in range(n):
        d, T, B = int(rng.integers(1, 7)), int(rng.integers(1, 13)), int(rng.integers(1, 4))
        X = rng.uniform(-1, 1, (B, T, d))
        eta = float(rng.uniform(0.01, 1.0))
        P0 = rng.standard_normal((d, d)) if i % 3 else None
        out, _ = R.lsa_forward(S.seq_tokens(X, P0), CC.causal_gd_layer(d, eta, P0), causal=True)
        E0 = S.seq_tokens(X, P0)
        worst = max(worst, _rel(out[..., :d], loop_causal_gd(X, eta, P0)), _rel(out[..., d:], E0[..., d:]))
        Em, _ = S.mask_forward(S.code_tokens(X), 2 * d)
        outc, _ = R.lsa_forward(Em, CC.causal_gd_layer(d, eta, layout="code"), causal=True)
        worst = max(worst, _rel(outc[..., :d], loop_causal_gd(X, eta)))
    tol = tolerance(np.float64, "construction")
    return Outcome.at_most(worst, tol.rtol, tol.reason, configurations=n)


# --------------------------------------------------------------------------------
# Prop. 2
# --------------------------------------------------------------------------------

def _prop2_run(X, omegas, ridge=CC.RIDGE):
    """Run the Richardson stack (K = len(omegas) - 1 layers + readout); return per iteration k
    (0..K) the worst bound ratio ||e_k|| / bound_k, the worst exactness error of u_k and of
    the prediction, and the mean relative error against exact ridge per k."""
    B, T, d = X.shape
    K = len(omegas) - 1
    gammas, coeffs = CC.richardson_coefficients(omegas, ridge)
    params, arch = CC.prop2_stack(d, gammas, coeffs)
    out, _ = R.model_forward(CC.precond_tokens(X, K), params, arch)
    slots = [out[..., d:2 * d]] + [out[..., (3 + j) * d:(4 + j) * d] for j in range(K)]
    ratio, exact, rel_k = np.zeros(K + 1), 0.0, np.zeros((K + 1, T))
    for b in range(B):
        for t in range(T):
            A, M = loop_system(X, b, t, ridge)
            lam = np.linalg.eigvalsh(A)
            x = X[b, t]
            sol = np.linalg.solve(A, x)
            us = loop_richardson(A, x, omegas)
            for k in range(K + 1):
                u = sum(coeffs[j] * slots[j][b, t] for j in range(k + 1))
                exact = max(exact, _rel(u, us[k]))
                bound = np.max(np.abs(np.prod([1 - w * lam for w in omegas[:k + 1]], axis=0))) * np.linalg.norm(sol)
                err = np.linalg.norm(us[k] - sol)
                ratio[k] = max(ratio[k], err / bound if bound > 0 else (0.0 if err == 0 else np.inf))
                if t > 0:                                      # M_0 = 0: the t = 0 prediction is 0 exactly
                    rel_k[k, t] += np.linalg.norm(M @ (u - sol)) / max(np.linalg.norm(M @ sol), 1e-300) / B
            exact = max(exact, _rel(out[b, t, :d], M @ us[K]))
    return ratio, exact, rel_k


def _lam_max(X, ridge=CC.RIDGE):
    return max(np.linalg.eigvalsh(loop_system(X, b, X.shape[1] - 1, ridge)[0]).max() for b in range(X.shape[0]))


def _prop2_outcome(ratio, exact, rel_k, reason_steps, **details):
    tol = tolerance(np.float64, "construction")
    measured = max(float(ratio.max()), exact / tol.rtol)
    return Outcome.at_most(measured, 1.0 + 1e-9,
                           "max over iterations k, sequences and t of ||u_k - A_t^{-1} x_t|| / bound_k (the spectral bound "
                           "max_i |prod_{j<=k} (1 - omega_j lam_i)| ||A_t^{-1} x_t||, geometric since every step is in "
                           f"(0, 2/lam_max)), and the layers' exactness error over its rtol {tol.rtol:g}; both must be "
                           f"<= 1 (1e-9 of rounding slack); the bound is attained (ratio 1) at t = 0, where A_0 = 1e-3 I. {reason_steps}",
                           bound_ratio_per_iteration=ratio, exactness_rel_err=exact,
                           mean_rel_pred_err_vs_ridge_per_iteration=rel_k.mean(axis=1),
                           rel_pred_err_vs_ridge_last_iteration_per_t=rel_k[-1], **details)


@claim("causal.prop2.neumann", source=f"{SRC}, Prop. 2 (truncated Neumann series)",
       statement="K causal LSA layers (K extra token slots) and a GD layer compute M_t u_k with u_k = omega sum_{j<=k} "
                 "(I - omega A_t)^j x_t exactly, and ||u_k - A_t^{-1} x_t|| <= rho_t^{k+1} ||A_t^{-1} x_t|| at every "
                 "iteration k and every t (A_t = sum_{t'<=t} x_t'-1 x_t'-1^T + 1e-3 I)",
       method="linear sequences (d = 10, T = 25; 4 sequences, 8 in full mode), omega = 1 / lam_max(A_T), K = 6; u_k read "
              "from the stack's slots against the loop-level Richardson iterate and the bound from eigvalsh(A_t)")
def _(ctx):
    X = _seqs(ctx.rng(240), 8 if ctx.full else 4, 25).X
    om = 1.0 / _lam_max(X)
    ratio, exact, rel_k = _prop2_run(X, [om] * 7)
    return _prop2_outcome(ratio, exact, rel_k, "omega = 1/lam_max", omega=om)


@claim("causal.prop2.richardson", source=f"{SRC}, Prop. 2 (Richardson iteration)",
       statement="K causal LSA layers and a GD layer compute M_t u_k for K + 1 non-stationary Richardson steps "
                 "u_{k+1} = u_k + omega_k (x_t - A_t u_k) exactly, within the bound max_i |prod_{j<=k} (1 - omega_j "
                 "lam_i(A_t))| ||A_t^{-1} x_t|| at every iteration and every t",
       method="linear sequences (d = 10, T = 25; 4 sequences, 8 in full mode), omega_k = (1 + 0.8 cos((2k+1) pi / 14)) "
              "/ lam_max(A_T) in (0.2, 1.8) / lam_max, K = 6")
def _(ctx):
    X = _seqs(ctx.rng(241), 8 if ctx.full else 4, 25).X
    lm = _lam_max(X)
    omegas = [(1 + 0.8 * np.cos((2 * k + 1) * np.pi / 14)) / lm for k in range(7)]
    ratio, exact, rel_k = _prop2_run(X, omegas)
    return _prop2_outcome(ratio, exact, rel_k, "omega_k in (0.2, 1.8) / lam_max", omegas=omegas)


@claim("causal.prop2.chebyshev_layers", source=f"{SRC}, Prop. 2 (Chebyshev-type, fixed normaliser)",
       statement="With a fixed normaliser nu in place of ||A_t||_F, the code's Chebyshev-type recursion (its 6-step and "
                 "2-step learned coefficients) is a fixed polynomial of A_t, and K causal LSA layers and a GD layer "
                 "compute M_t inv_K(A_t) x_t exactly",
       method="linear sequences (d = 10, T = 20, 3 sequences), nu = ||A_T||_F of the first sequence; layer stack vs the "
              "loop-level matrix recursion with the same nu; worst relative error")
def _(ctx):
    X = _seqs(ctx.rng(242), 3, 20).X
    d = X.shape[2]
    nu = float(np.linalg.norm(loop_system(X, 0, X.shape[1] - 1, CC.RIDGE)[0]))
    worst = 0.0
    for alphas, betas in (CC.CHEBYSHEV_6, CC.CHEBYSHEV_2):
        K = len(alphas)
        gammas = [1.0 / nu] * K
        coeffs = CC.polynomial_coefficients(CC.chebyshev_polynomial(alphas, betas, nu), gammas)
        params, arch = CC.prop2_stack(d, gammas, coeffs)
        out, _ = R.model_forward(CC.precond_tokens(X, K), params, arch)
        want = np.zeros_like(X)
        for b in range(X.shape[0]):
            for t in range(X.shape[1]):
                A, M = loop_system(X, b, t, CC.RIDGE)
                want[b, t] = M @ loop_chebyshev(A, alphas, betas, nu)[-1] @ X[b, t]
        worst = max(worst, _rel(out[..., :d], want))
    return Outcome.at_most(worst, 1e-9, "the change of basis to the slots' polynomials is a triangular solve whose "
                           "coefficients reach ~1e1 with cancellation: a few hundred ulps of the output, 1e-9 relative",
                           nu=nu)


@claim("causal.prop2.chebyshev_code", source=f"{SRC}, Prop. 2 baseline as coded (normalised Chebyshev iteration)",
       statement="The code's normalised Chebyshev-type iteration with its learned 6-step coefficients approaches exact "
                 "ridge (lambda 1e-3) without a guarantee: its error per iteration and per t is reported; after 6 steps "
                 "the mean relative prediction error over t >= 10 is below the measured threshold",
       method="linear sequences (d = 10, T = 50; 16 sequences, 64 in full mode); chebyshev_predict against loop-level "
              "ridge, and the loop-level recursion against chebyshev_predict (exactness in details)")
def _(ctx):
    X = _seqs(ctx.rng(243), 64 if ctx.full else 16, 50).X
    B, T, d = X.shape
    ridge = loop_ridge(X)
    out = {}
    exact = 0.0
    for name, (alphas, betas) in (("6-step", CC.CHEBYSHEV_6), ("2-step", CC.CHEBYSHEV_2)):
        cp = CC.chebyshev_predict(X, alphas, betas)                    # (K+1, B, T, d)
        for b, t in ((0, T - 1), (B - 1, 3)):
            A, M = loop_system(X, b, t, CC.RIDGE)
            invs = loop_chebyshev(A, alphas, betas, np.linalg.norm(A))
            exact = max(exact, max(_rel(cp[k, b, t], M @ invs[k] @ X[b, t]) for k in range(len(invs))))
        rel = np.linalg.norm(cp - ridge, axis=-1) / np.maximum(np.linalg.norm(ridge, axis=-1), 1e-300)  # (K+1, B, T)
        out[name] = {"mean_rel_err_per_iteration": rel[:, :, d:].mean(axis=(1, 2)),
                     "mean_rel_err_per_t_last_iteration": rel[-1].mean(axis=0)}
    final = float(out["6-step"]["mean_rel_err_per_iteration"][-1])
    if exact > tolerance(np.float64, "construction").rtol:
        final = np.inf
    return Outcome.at_most(final, 0.2, "a measured threshold, not a bound: the learned coefficients were fit to the "
                           "training loss, not to a spectral bound; 0.2 is about twice the error of the default seed, so "
                           "a changed iteration or data distribution is flagged while sampling is not",
                           exactness_rel_err=exact, **out)


# --------------------------------------------------------------------------------
# Baselines and the loss
# --------------------------------------------------------------------------------

@claim("causal.baselines.per_step", source=f"{SRC}, Sec. 4 (baselines per time step)",
       statement="The per-time-step baselines equal their loop-level definitions: exact ridge (1e-3) on the pairs before "
                 "t, GD (Prop. 1) with the line-searched eta (the quadratic-in-eta loss equals a brute-force grid), and the "
                 "per-step sequence loss (1/2 squared error summed over dims, averaged over batch, mean over t = L)",
       method="linear sequences (d = 10, T = 30, 6 sequences); worst relative error; details: per-t losses of GD, ridge "
              "and the 6-step Chebyshev baseline")
def _(ctx):
    s = _seqs(ctx.rng(250), 6, 30)
    X, Y = s.X, s.Y
    ridge = CC.ridge_predict(X)
    worst = _rel(ridge, loop_ridge(X))
    grid = np.arange(0.001, 0.5, 0.01)
    eta, losses = CC.line_search_eta(X, Y, grid)
    brute = []
    for e in grid:
        pr = loop_causal_gd(X, e) if e in grid[::7] else CC.causal_gd_predict(X, e)
        brute.append(0.5 * np.mean(np.sum((pr - Y) ** 2, axis=2)))
    worst = max(worst, _rel(losses, np.array(brute)), 0.0 if eta == grid[int(np.argmin(brute))] else np.inf)
    per_t = {}
    for name, pred in (("gd", CC.causal_gd_predict(X, eta)), ("ridge", ridge),
                       ("chebyshev6", CC.chebyshev_predict(X, *CC.CHEBYSHEV_6)[-1])):
        L, lt, _ = S.seq_loss_forward(pred, Y)
        loops = np.array([np.mean([0.5 * np.sum((pred[b, t] - Y[b, t]) ** 2) for b in range(X.shape[0])])
                          for t in range(X.shape[1])])
        worst = max(worst, _rel(lt, loops), _rel(L, loops.mean()))
        per_t[name] = lt
    tol = tolerance(np.float64, "construction")
    return Outcome.at_most(worst, tol.rtol, tol.reason, eta_line_search=eta, per_t_losses=per_t)


@claim("sequences.loss_backward.complex_step", source="hand-written backward (reference/sequences.py)",
       statement="The sequence loss's backward (mean 1/2 squared error over batch and time, plus-sign readout of the "
                 "first d channels, causal LSA layers in reverse, the code's input masking) equals complex-step "
                 "derivatives with respect to the tokens and every parameter",
       method="1- and 2-layer causal stacks, spec and code layouts (masked), random parameters, d 2..3, T 3..6; 4 random "
              "directions plus entrywise; worst relative error")
def _(ctx):
    rng = ctx.rng(260)
    worst = 0.0
    for i in range(4):
        d, T, K = int(rng.integers(2, 4)), int(rng.integers(3, 7)), 1 + i % 2
        X = rng.uniform(-1, 1, (2, T + 1, d))
        E = S.code_tokens(X[:, :T]) if i >= 2 else S.seq_tokens(X[:, :T])
        mask = 2 * d if i >= 2 else 0
        Y = X[:, 1:]
        arch = R.lsa_stack(K, causal=True)
        params = tuple(R.init_lsa_params(rng, E.shape[2], H=2, key_size=d, scale=3.0, dtype=np.float64)
                       for _ in range(K))
        L, grads, aux = S.seq_loss_and_grads(E, Y, params, arch, mask=mask)

        def f(args, arch=arch, Y=Y, d=d, mask=mask, K=K):
            ps = tuple(R.LSAParams(*args[1 + 4 * k:5 + 4 * k]) for k in range(K))
            h, _ = S.mask_forward(args[0], mask)
            out, _ = R.model_forward(h, ps, arch)
            return S.seq_loss_forward(out[..., :d], Y)[0]

        flat = [E] + [a for p in params for a in p]
        ana = [aux["dE"]] + [a for g in grads for a in g]
        r = check_gradients(f, flat, ana, rng, entrywise=(i == 0))
        worst = max(worst, r.rel_err if r.ok else np.inf)
    tol = tolerance(np.float64, "complex_step")
    return Outcome.at_most(worst, tol.rtol, tol.reason)
