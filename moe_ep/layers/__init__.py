"""MoE layers: gating rules, experts, and the ExpertParallelMoE module."""
