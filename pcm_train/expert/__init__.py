"""Scripted experts that generate demonstrations from privileged simulator state."""
from .object_expert import PHASES, Episode, GraspPlan, ObjectExpert, run_episode

__all__ = ["PHASES", "Episode", "GraspPlan", "ObjectExpert", "run_episode"]
