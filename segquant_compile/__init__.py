"""segquant-compile: a torch.compile backend for SegQuant post-training quantization."""
from segquant_compile import presets
from segquant_compile.allocation import Allocation, allocate
from segquant_compile.backend import compile, segquant_backend
from segquant_compile.calibration import calibrate
from segquant_compile.config import QuantConfig
from segquant_compile.explain import explain, report
from segquant_compile.options import resolve_options
from segquant_compile.persist import save
from segquant_compile.pipeline import quantize_pipeline
from segquant_compile.report import Report
from segquant_compile.sensitivity import Sensitivity, sensitivity

__all__ = ["Allocation", "QuantConfig", "Report", "Sensitivity", "allocate", "calibrate", "compile", "explain",
           "presets", "quantize_pipeline", "report", "resolve_options", "save", "segquant_backend", "sensitivity"]
__version__ = "0.1.0"
