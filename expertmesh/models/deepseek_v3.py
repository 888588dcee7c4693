"""DeepSeek-V3 and R1: sigmoid scores with an
``e_score_correction_bias`` for selection (noaux_tc), all inside mlx-lm's own
``MoEGate``; otherwise laid out like DeepSeek-V2, but its attention takes
only an array mask (it ``mx.where``s it)."""

from . import deepseek_v2


class Adapter(deepseek_v2.Adapter):
    model_type = "deepseek_v3"
    array_mask = True
