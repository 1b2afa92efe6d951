"""Token conventions (von Oswald et al. 2023, Sec. 2; official code). One place only.

A regression task becomes a sequence E of T = N + 1 tokens of width D = d + d_y:

    E[:, i] = (x_i, y_i)        for context tokens i = 0 .. N-1
    E[:, N] = (x_q, -W_0 x_q)   the query token, last; with W_0 = 0 its y-slot is 0

The model's prediction for the query is read from the query token after the last
layer as **minus** its y-slot:  y_hat = -E_out[:, N, d:].

:class:`TokenLayout` bundles this: it knows d and d_y, builds the tokens and reads
the prediction, so the model, the loss and the analyses take a layout instead of d.
"""

from dataclasses import dataclass

from ._checks import check_array, check_data, check_int, check_same_dtype, check_W_0
from .xp import get_xp


def check_task_data(X, Y, x_q, names=("X", "Y", "x_q")):
    """Raise unless X (B, N, d), Y (B, N, d_y) and x_q (B, d) are task data of one float
    dtype with every size >= 1 and entries within the data limit. Returns (B, N, d, d_y)."""
    nX, nY, nq = names
    check_data(nX, X, dims=("B", "N", "d"))
    B, N, d = X.shape
    check_data(nY, Y, dims=("B", "N", "d_y"))
    if Y.shape[:2] != (B, N):
        raise ValueError(f"{nY} must have shape ({B}, {N}, d_y) to match {nX}, got {tuple(Y.shape)}")
    check_data(nq, x_q, shape=(B, d))
    check_same_dtype(**{nX: X, nY: Y, nq: x_q})
    return B, N, d, Y.shape[2]


def build_tokens(X, Y, x_q, W_0=None):
    """Tokens E (B, N+1, D) from X (B, N, d), Y (B, N, d_y), x_q (B, d).

    ``W_0`` (d_y, d) or (B, d_y, d), optional: the query's y-slot starts at -W_0 x_q,
    which makes the GD construction start from W_0 (Prop. 1).
    """
    B, N, d, d_y = check_task_data(X, Y, x_q)
    check_W_0(W_0, ((d_y, d), (B, d_y, d)), X.dtype)
    xp = get_xp(X, Y, x_q, W_0)
    dtype = xp.result_type(X, Y, x_q)
    E = xp.zeros((B, N + 1, d + d_y), dtype=dtype)                    # (B, T, D)
    E[:, :N, :d] = X
    E[:, :N, d:] = Y
    E[:, N, :d] = x_q
    if W_0 is not None:
        spec = "ij,bj->bi" if W_0.ndim == 2 else "bij,bj->bi"      # shared or per-task W_0
        E[:, N, d:] = -xp.einsum(spec, W_0, x_q)
    return E


def split_token(E, d):
    """Split tokens (..., D) into their x part (..., d) and y part (..., D - d)."""
    return E[..., :d], E[..., d:]


def readout(E, d):
    """Prediction y_hat (B, d_y) = minus the y-slot of the last (query) token."""
    check_array("E", E, ndim=3)
    d = check_int("d", d, 1, E.shape[2] - 1)
    return -E[:, -1, d:]


def readout_backward(dpred, E_shape, d):
    """Backward of :func:`readout`: forward y_hat = -E[:, -1, d:], so
    dE[:, -1, d:] = -dy_hat and every other entry of dE is zero."""
    xp = get_xp(dpred)
    dE = xp.zeros(E_shape, dtype=dpred.dtype)                          # (B, T, D)
    dE[:, -1, d:] = -dpred
    return dE


@dataclass(frozen=True)
class TokenLayout:
    """How a regression task is laid out as tokens and where the prediction is read.

    ``kind = "regression"`` (the only layout so far): tokens (x_i, y_i) for the N context
    pairs and (x_q, -W_0 x_q) for the query, last, width D = d + d_y; the prediction is
    minus the query's y-slot after the last layer."""

    d: int
    d_y: int = 1
    kind: str = "regression"

    def __post_init__(self):
        check_int("d", self.d, 1)
        check_int("d_y", self.d_y, 1)
        if self.kind != "regression":
            raise ValueError(f"layout kind must be 'regression', got {self.kind!r}")

    @property
    def D(self):
        """Token width."""
        return self.d + self.d_y

    @property
    def D_in(self):
        """The width of the tokens :meth:`build` makes (the model's input width): D here."""
        return self.d + self.d_y

    def n_tokens(self, N):
        """T = N + 1 tokens for N context pairs."""
        return N + 1

    def build(self, X, Y, x_q, W_0=None):
        """:func:`build_tokens`, checked against this layout's widths."""
        check_task_data(X, Y, x_q)
        if X.shape[2] != self.d or Y.shape[2] != self.d_y:
            raise ValueError(f"X and Y must have widths d={self.d}, d_y={self.d_y} for this layout, got "
                             f"{X.shape[2]} and {Y.shape[2]}")
        return build_tokens(X, Y, x_q, W_0)

    def readout(self, E):
        """y_hat (B, d_y) = minus the y-slot of the query token."""
        check_array("E", E, ndim=3)
        if E.shape[2] != self.D:
            raise ValueError(f"E must have token width D={self.D} for this layout, got shape {tuple(E.shape)}")
        return readout(E, self.d)

    def readout_backward(self, dpred, E_shape):
        return readout_backward(dpred, E_shape, self.d)


def layout_for_width(d, d_y, width):
    """The regression layout of tasks (d, d_y) for a model whose output tokens have
    ``width`` features: :class:`TokenLayout` when width = d + d_y, else
    :class:`EmbeddedLayout` (minus the last d_y features of the query in both)."""
    if width == d + d_y:
        return TokenLayout(d, d_y)
    return EmbeddedLayout(d, d_y, width=width)


def as_layout(layout, D):
    """``layout`` as a :class:`TokenLayout`; an int is the regression layout's d with
    d_y = D - d (for tokens of width D)."""
    if isinstance(layout, TokenLayout):
        return layout
    d = check_int("d", layout, 1, D - 1)
    return TokenLayout(d, D - d)


@dataclass(frozen=True)
class EmbeddedLayout(TokenLayout):
    """The regression layout of a model that changes the token width (an embedding, or
    concatenated positional encodings): tokens are built as :class:`TokenLayout`'s,
    (x_i, y_i) and (x_q, -W_0 x_q) of width d + d_y (:attr:`D_in`), and the prediction
    is minus the **last** d_y features of the query token after the last layer, whose
    width is ``width`` (:attr:`D`, what the loss compares with the model's output width).
    The official sine-task model (tokens (x, y), an embedding to width 40) reads minus
    feature 39 of the query: ``EmbeddedLayout(1, 1, width=40)``. With width = d + d_y it
    reads what :class:`TokenLayout` reads."""

    width: int = None
    kind: str = "embedded"

    def __post_init__(self):
        check_int("d", self.d, 1)
        check_int("d_y", self.d_y, 1)
        check_int("width", self.width, self.d_y + 1)
        if self.kind != "embedded":
            raise ValueError(f"EmbeddedLayout kind must be 'embedded', got {self.kind!r}")

    @property
    def D(self):
        """The width of the tokens the readout reads (the model's output width)."""
        return self.width

    @property
    def D_in(self):
        """The width of the tokens :meth:`build` makes, d + d_y."""
        return self.d + self.d_y

    def readout(self, E):
        """y_hat (B, d_y) = minus the last d_y features of the query token."""
        check_array("E", E, ndim=3)
        if E.shape[2] != self.width:
            raise ValueError(f"E must have token width {self.width} for this layout, got shape {tuple(E.shape)}")
        return -E[:, -1, self.width - self.d_y:]

    def readout_backward(self, dpred, E_shape):
        """Forward y_hat = -E[:, -1, width - d_y:], so that block of dE is -dy_hat, the
        rest zero."""
        xp = get_xp(dpred)
        dE = xp.zeros(E_shape, dtype=dpred.dtype)                      # (B, T, width)
        dE[:, -1, self.width - self.d_y:] = -dpred
        return dE
