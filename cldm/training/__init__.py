"""Training of the small demo model family (shapes pictures, VAE, base, ControlNets) and its evaluation.

Apart from inference: nothing in `cldm`'s core or the app imports this package; `python -m cldm train` and
`python -m cldm demo-eval` reach it through `cldm.training.cli`. What the app needs to know of the demo model is in
the model card the export writes (`cldm.io.model_card`).
"""
