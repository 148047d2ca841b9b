"""`recurchat speedrun`: the whole pipeline in one command (stages.py) and the report card it ends with (card.py)."""

from recurchat.speedrun.stages import SPEEDRUNS, SpeedrunPreset, speedrun

__all__ = ["SPEEDRUNS", "SpeedrunPreset", "speedrun"]
