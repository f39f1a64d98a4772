"""mimiq_mm.quant: fake-quant primitives, quantizer modules, QuantConfig and quantize_()."""
from .api import (calibration_mode, count_quant_modules, dequantize_, get_scope,
                  lsq_parameters, quant_modules, quant_state, quantize_, quantizers,
                  set_quant_state)
from .config import QuantConfig, QuantizerConfig, parse_bit_widths
from .modules import MatMul, QuantConv2d, QuantLinear, QuantMatMul
from .observers import (EMAObserver, MeanAbsObserver, MinMaxObserver, MSEObserver,
                        Observer, PercentileObserver, build_observer)
from .quantizers import NotCalibratedError, Quantizer
from .reparam import (NormLinearPair, find_reparam_pairs, register_reparam_block,
                      reparam_layernorm_linear_)

__all__ = [
    'QuantConfig', 'QuantizerConfig', 'parse_bit_widths', 'quantize_', 'dequantize_',
    'calibration_mode', 'set_quant_state', 'quant_state', 'quant_modules',
    'count_quant_modules', 'quantizers',
    'lsq_parameters', 'get_scope', 'MatMul', 'QuantLinear', 'QuantConv2d', 'QuantMatMul',
    'Quantizer', 'NotCalibratedError', 'Observer', 'MinMaxObserver', 'EMAObserver',
    'PercentileObserver', 'MSEObserver', 'MeanAbsObserver', 'build_observer',
    'NormLinearPair', 'register_reparam_block', 'find_reparam_pairs',
    'reparam_layernorm_linear_',
]
