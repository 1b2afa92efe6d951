"""Classic tokens: one token per x and one per y (von Oswald et al. 2023, Sec. 4, Prop. 3).

A regression task becomes a sequence of T = 2N + 1 tokens of width d (the official
code's induction-head experiment, paper-settings.md section 7a):

    position 2j     : x_j                        (j = 0 .. N-1)
    position 2j + 1 : (0, ..., 0, y_j)           d - d_y zeros, then y_j
    position 2N     : x_q                        the query, last

There is no label slot in the query token. Positional information is a model layer
(kind ``"posenc"``: ``mode="concat"`` with ``width=10`` as the official code, or
``mode="add"``), so :class:`ClassicLayout` builds the bare tokens (width d, its
:attr:`D_in`) and reads the prediction at the model's output width ``width`` (its
:attr:`D`) as **minus the last d_y features of the query token** after the last layer.
With concatenated encodings of width P those features are the last d_y encoding
channels, which hold ``pe[2N, P-d_y:]`` before any layer writes to them, not 0
(``pe[2N, P-1] = cos(2N * 10000^(-(P-2)/P))`` for even P: ``pe[20, 9] = cos(20 * 10000^(-0.8)) =
cos(0.01262) = 0.99992`` at the official N = 10, P = 10);
a model must absorb that offset (:func:`readout_offset`).

Not in this file: the encodings themselves (``reference/layers/posenc.py``), the copy
construction of Prop. 3 (``reference/copy_construction.py``) and the copy diagnostics
(``reference/copy_analysis.py``).
"""

from dataclasses import dataclass

from ._checks import check_int
from .tokens import EmbeddedLayout, check_task_data
from .xp import get_xp

TOKEN_KINDS = ("constructed", "classic")      # the data config's ``tokens`` field


def x_positions(N):
    """Positions of the x tokens, 0, 2, ..., 2N - 2."""
    return list(range(0, 2 * check_int("N", N, 1), 2))


def y_positions(N):
    """Positions of the y tokens, 1, 3, ..., 2N - 1."""
    return list(range(1, 2 * check_int("N", N, 1), 2))


def build_classic_tokens(X, Y, x_q):
    """Tokens E (B, 2N+1, d) from X (B, N, d), Y (B, N, d_y), x_q (B, d), d >= d_y:
    E[:, 2j] = x_j, E[:, 2j+1] = (0, y_j), E[:, 2N] = x_q."""
    B, N, d, d_y = check_task_data(X, Y, x_q)
    if d_y > d:
        raise ValueError(f"classic tokens put y_j in the last d_y features of a width-d token, so d_y <= d is "
                         f"needed; got X of shape {tuple(X.shape)} (d={d}) and Y of shape {tuple(Y.shape)} (d_y={d_y})")
    xp = get_xp(X, Y, x_q)
    E = xp.zeros((B, 2 * N + 1, d), dtype=xp.result_type(X, Y, x_q))     # (B, T, d)
    E[:, 0:2 * N:2, :] = X
    E[:, 1:2 * N:2, d - d_y:] = Y
    E[:, 2 * N, :] = x_q
    return E


def readout_offset(N, P, d_y=1):
    """``pe[2N, P-d_y:]`` (d_y,) float64: what the readout of a model with concatenated
    encodings of width P reads from the query when no layer writes to those channels."""
    from .layers.posenc import positional_encoding

    N, P, d_y = check_int("N", N, 1), check_int("P", P, 1), check_int("d_y", d_y, 1)
    if d_y > P:
        raise ValueError(f"d_y must be <= the encoding width P={P}, got {d_y}")
    return positional_encoding(2 * N + 1, P)[2 * N, P - d_y:]


@dataclass(frozen=True)
class ClassicLayout(EmbeddedLayout):
    """The classic-token layout (module docstring): tokens of width d (:attr:`D_in`),
    ``n_tokens(N) = 2N + 1``, prediction = minus the last d_y features of the query at
    the model's output width ``width`` (:attr:`D`; None: d, a model that keeps the
    width). Kind ``"classic"``. Its readout and backward are :class:`EmbeddedLayout`'s."""

    width: int = None
    kind: str = "classic"

    def __post_init__(self):
        check_int("d", self.d, 1)
        check_int("d_y", self.d_y, 1, self.d)
        if self.width is None:
            object.__setattr__(self, "width", self.d)
        check_int("width", self.width, self.d_y)
        if self.kind != "classic":
            raise ValueError(f"ClassicLayout kind must be 'classic', got {self.kind!r}")

    @property
    def D_in(self):
        """The width of the tokens :meth:`build` makes: d."""
        return self.d

    def n_tokens(self, N):
        """T = 2N + 1 tokens for N context pairs."""
        return 2 * check_int("N", N, 1) + 1

    def build(self, X, Y, x_q, W_0=None):
        """:func:`build_classic_tokens`, checked against this layout's widths. ``W_0``
        must be None: the query token has no label slot to start from."""
        if W_0 is not None:
            raise ValueError("W_0 must be None for classic tokens: the query token x_q has no label slot, "
                             f"got an array of shape {getattr(W_0, 'shape', None)}")
        check_task_data(X, Y, x_q)
        if X.shape[2] != self.d or Y.shape[2] != self.d_y:
            raise ValueError(f"X and Y must have widths d={self.d}, d_y={self.d_y} for this layout, got "
                             f"{X.shape[2]} and {Y.shape[2]}")
        return build_classic_tokens(X, Y, x_q)


def classic_layout(arch, d, d_y=1):
    """The classic layout of model ``arch`` on tasks (d, d_y): tokens of width d in, the
    prediction read at the last layer's width ``arch.widths(d)[-1]``."""
    return ClassicLayout(d, d_y, width=arch.widths(d)[-1])
