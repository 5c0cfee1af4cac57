"""ONNX export of QoS-Nets: the ``ai.qosnets`` ops (ApproxConv, ApproxGemm) with
model-local function bodies in standard ONNX, the whole-network exporter for all
operating points, and onnxruntime helpers. Specification: docs/onnx_ops.md.
"""
from .check import LayerTrace, check_model, layer_accumulators, make_session, run_onnxruntime
from .export import DEFAULT_OPSET, LayerExport, OnnxExport, export_onnx
from .ops import APPROX_CONV, APPROX_GEMM, DOMAIN, DOMAIN_VERSION, function_protos, op_schemas, register_schemas

__all__ = ["export_onnx", "OnnxExport", "LayerExport", "DEFAULT_OPSET", "check_model", "make_session",
           "run_onnxruntime", "layer_accumulators", "LayerTrace", "DOMAIN", "DOMAIN_VERSION", "APPROX_CONV",
           "APPROX_GEMM", "function_protos", "op_schemas", "register_schemas"]
