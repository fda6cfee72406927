"""Batch inference: score tables in a data lake through a `Predictor`, resumably.

readers -> mapping -> scoring -> writer, one input file ("fragment") at a time; `job` plans and
resumes, `local_engine` / `ray_engine` spread fragments over processes or a Ray cluster.
"""
