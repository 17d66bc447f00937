"""The Ray orchestration layer: extract, build-bank and score as distributed jobs.

Everything here moves data and schedules work; the algorithm lives in the Ray-free modules of
``spade_ray`` (features, correspondence, fusion, shard, bank).
"""
