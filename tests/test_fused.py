"""Gate and up projections as one gathered matmul give what mlx-lm's SwitchGLU gives, bit for bit."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from expertmesh import fused


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 20])  # 20 tokens x 4 slots: SwitchGLU sorts them by expert first
def test_fused_switch_mlp_computes_exactly_what_switchglu_computes(bits, tokens):
    mx.random.seed(tokens)
    glu = SwitchGLU(128, 64, 16)
    if bits:
        nn.quantize(glu, group_size=64, bits=bits)
    mx.eval(glu.parameters())
    both = fused.fuse(glu)
    assert isinstance(both, fused.FusedSwitchGLU) and "gate_up" in both and "gate_proj" not in both
    x = mx.random.normal((2, tokens, 128))
    idx = mx.random.randint(0, 16, (2, tokens, 4))
    assert mx.array_equal(both(x, idx), glu(x, idx)).item()


def test_only_a_plain_switchglu_with_matching_projections_is_fused():
    glu = SwitchGLU(128, 64, 16)
    nn.quantize(glu, group_size=64, bits=4)
    glu.up_proj = glu.up_proj.__class__(128, 64, 16, bias=False, group_size=32, bits=4)  # another group size
    assert fused.fuse(glu) is glu
    fused.configure(False)
    try:
        plain = SwitchGLU(128, 64, 16)
        assert fused.fuse(plain) is plain
    finally:
        fused.configure(True)
