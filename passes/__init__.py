"""Graph analysis on dynamo FX graphs: linear sites, SegLinear segments, DualScale (the Plan)."""
from .names import param_names, source_to_name
from .plan import DualScale, LinearSite, Plan, Segmentation, build_plan, find_sites, merge
from .segment_graph import segment_graph

__all__ = ["DualScale", "LinearSite", "Plan", "Segmentation", "build_plan", "find_sites", "merge",
           "param_names", "segment_graph", "source_to_name"]
