"""Flows: the stages put together. :mod:`pipeline.flows.living` is ``zsl run``, the living pipeline that keeps
features, classes, model, labels and index current; :mod:`pipeline.flows.record` writes what each run did."""
