"""Pictures for the reports (matplotlib, the optional ``plots`` extra). Never imported by the core.

One module per topic; each function takes already-computed numbers and writes a PNG.
"""

from __future__ import annotations


def require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend, or raise a clear ImportError."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"plots need matplotlib, which is not installed ({exc}); install it with: pip install 'gradcomp[plots]'"
        ) from exc
    return plt


def save_figure(fig, path, dpi: int = 120) -> str:
    """Lay out ``fig``, write it as a PNG to ``path``, close it, and return the path as a string."""
    plt = require_matplotlib()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
