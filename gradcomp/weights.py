"""Weight quantization, under its short name: everything here lives in :mod:`gradcomp.quant`.

Configs and spec strings in :mod:`gradcomp.quant.configs`, rules in :mod:`gradcomp.quant.rules`,
packed layers and ``quantize_`` in :mod:`gradcomp.quant.modules`, sizes in
:mod:`gradcomp.quant.sizes`, files in :mod:`gradcomp.quant.serialization`, the weight analysis in
:mod:`gradcomp.quant.weight_report`. See docs/weights.md.
"""

from __future__ import annotations

from gradcomp.quant import configs, fake_quant, modules, rules, serialization, sizes, weight_report
from gradcomp.quant.configs import *  # noqa: F401,F403
from gradcomp.quant.rules import *  # noqa: F401,F403
from gradcomp.quant.modules import *  # noqa: F401,F403
from gradcomp.quant.fake_quant import *  # noqa: F401,F403
from gradcomp.quant.sizes import *  # noqa: F401,F403
from gradcomp.quant.serialization import *  # noqa: F401,F403
from gradcomp.quant.weight_report import *  # noqa: F401,F403

__all__ = [
    *configs.__all__,
    *rules.__all__,
    *modules.__all__,
    *fake_quant.__all__,
    *sizes.__all__,
    *serialization.__all__,
    *weight_report.__all__,
]
