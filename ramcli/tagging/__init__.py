"""Pixels to tags: the pipeline, its arithmetic, the decision rule, a run and the watcher."""
