"""PyTorch emulation of approximate-multiplier networks (QoS-Nets layers, bank, wrapper).

    net = wrap_model(model, [get("mul8u_1JFF"), get("mul8u_1446")], num_ops=2)
    net.set_mode(Mode.QUANT); net.train(); ...          # QAT: observers settle
    net.set_assignment([[0, 0, 0], [1, 1, 0]])           # assign[op][layer] -> bank index
    net.set_mode(Mode.APPROX); net.set_operating_point(1); net.eval(); y = net(x)

``functional``: fast bit-exact approximate conv/GEMM accumulators; ``emulation``: the
per-circuit strategy analysis behind them; ``kernels``: the C kernels (lookup GEMM,
quantize, term expansion), built on first use.
"""
from .bank import MultiplierBank
from .layers import ApproxConv2d, ApproxLinear
from .multibn import MultiBatchNorm, MultiBatchNorm1d, MultiBatchNorm2d
from .quant import Mode, QuantConfig
from .wrap import LayerInfo, QoSNet, approx_layers, float_epilogues, wrap_model

__all__ = ["Mode", "QuantConfig", "ApproxConv2d", "ApproxLinear", "MultiBatchNorm", "MultiBatchNorm1d",
           "MultiBatchNorm2d", "MultiplierBank", "QoSNet", "wrap_model", "approx_layers", "LayerInfo",
           "float_epilogues"]
