"""Graph analysis on dynamo FX graphs: linear sites, SegLinear segments, DualScale (the Plan)."""
from .inline import inline_opaque
from .names import param_names, source_to_name
from .plan import DualScale, LinearSite, Plan, Segmentation, build_plan, merge
from .segment_graph import segment_graph
from .sites import FloatCall, find_sites
from .transparency import Transparency, classify

__all__ = ["DualScale", "FloatCall", "LinearSite", "Plan", "Segmentation", "Transparency", "build_plan",
           "classify", "find_sites", "inline_opaque", "merge", "param_names", "segment_graph",
           "source_to_name"]
