"""icgd verify: the paper's claims, each checked and reported.

``python -m verify`` runs every registered claim (quick mode by default, ``--full``
for the paper's settings), prints one verdict line per claim with its measured value
and tolerance, writes JSON/markdown reports and exits non-zero if any claim fails.

Claims live in modules named ``verify.claims_*`` (found automatically); each
registers functions with :func:`verify.registry.claim`.
"""

from reference import __version__  # noqa: F401  (one version for the distribution)
