"""Running notebooks: the notebook session, the papermill pipeline, the study, torchrun fits."""
