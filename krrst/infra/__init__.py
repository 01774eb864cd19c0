"""Plumbing that knows no method: files, configs, errors, devices and speed, processes, progress, the run scaffold.

A researcher reading the algorithm can skip this package. Nothing here imports
a stage (teacher, distill, evaluate, ...): imports run from the stages down.
"""
