"""Scripted experts that generate demonstrations from privileged simulator state."""
from .episode import Episode, EpisodeRecorder
from .object_expert import PHASES, GraspPlan, ObjectExpert, run_episode

__all__ = ["PHASES", "Episode", "EpisodeRecorder", "GraspPlan", "ObjectExpert", "run_episode"]
