"""`python -m dmvae_lib --preset cpu`: the pipeline (notebooks
10–60 through papermill); see workflow/pipeline.py."""

import sys

from .workflow.pipeline import main

sys.exit(main())
