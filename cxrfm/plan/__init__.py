"""ZeRO memory and time planner (`cxrfm plan`): costs.py counts a spec's bytes and FLOPs per step and holds
the GPU table, planner.py turns them into per-stage rows and a recommendation, cli.py is the command."""

from cxrfm.plan.costs import (GPUS, INTERCONNECTS, OPTIONS, GiB, MiB, ModelShape, ModelStates, activation_breakdown,
                              activation_bytes, diffusion_profile, host_usable, inter_node_bw, model_shape,
                              model_states, step_flops)
from cxrfm.plan.planner import Plan, Row, format_plan, make_plan, recommend

__all__ = ["GPUS", "INTERCONNECTS", "OPTIONS", "GiB", "MiB", "ModelShape", "ModelStates", "Plan", "Row",
           "activation_breakdown", "activation_bytes", "diffusion_profile", "format_plan",
           "host_usable", "inter_node_bw", "make_plan", "model_shape", "model_states", "recommend", "step_flops"]
